"""A real HTTP MJPEG server for the tests (what many IP cameras serve): multipart/x-mixed-replace JPEG frames of a
moving test pattern, 10 frames/s, 320x240, to every client, from Python's http.server in its own process.

    python tests/servers/mjpeg_server.py PORT     -> http://127.0.0.1:PORT/cam.mjpg ; prints "ready" when up
"""
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

BOUNDARY = b"frame"
FPS = 10


def frame(i: int) -> bytes:
    """A JPEG of a ball moving over a gradient, different every frame."""
    image = np.zeros((240, 320, 3), np.uint8)
    image[:] = np.linspace(40, 200, 320, dtype=np.uint8)[None, :, None]
    cv2.circle(image, (20 + (i * 7) % 280, 120), 18, (30, 200, 240), -1)
    return cv2.imencode(".jpg", image)[1].tobytes()


class Stream(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path != "/cam.mjpg":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY.decode()}")
        self.end_headers()
        i, next_at = 0, time.monotonic()
        try:
            while True:
                data = frame(i)
                self.wfile.write(b"--" + BOUNDARY + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                 + str(len(data)).encode() + b"\r\n\r\n" + data + b"\r\n")
                self.wfile.flush()
                i, next_at = i + 1, next_at + 1 / FPS
                time.sleep(max(0.0, next_at - time.monotonic()))
        except (BrokenPipeError, ConnectionResetError):
            return

    def log_message(self, *args) -> None:  # quiet
        return


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Stream)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
