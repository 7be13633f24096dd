"""`patchcore eval` side by side with the OFFICIAL PatchCore (amazon-science/patchcore-inspection) on the same
machine, backbone (torchvision mobilenet_v2, ImageNet weights, taps features.6 + features.13) and data: images/s,
build seconds, image AUROC and pixel AUROC of each. Prints a row per run and writes bench/results/vs_official.json.

    .venv/bin/python bench/vs_official.py --official /work/official-patchcore/src [--data ROOT]
        [--sets mvtec_bottle,visa_macaroni1] [--rounds 2] [--banks DIR]

--official is the `src` folder of a checkout of the official code (its `patchcore` package; never part of this
repository, which has a package of the same name: the official one is imported in a child process). It runs under
this checkout's .venv; `timm` (imported by its backbones.py, unused with a torchvision model object) is stubbed
when missing. Official side, as its bin/run_patchcore.py defaults (seed 0, approx. greedy coreset 10 %,
1024/1024 dims, patch size 3, 1 NN: its --anomaly_scorer_num_nn never reaches PatchCore.load, whose parameter is
anomaly_score_num_nn) but FAISS on 2 threads and the backbone above: fit on train/good through its MVTecDataset
(decode included: "build s"), then `predict` on the test images already decoded and pre-processed into tensors
(resize 256, centre crop 224, ImageNet normalisation: excluded), batches of 16, after a 1-image warm-up; image
AUROC and full pixel AUROC with its own metrics.py. This project: `patchcore bank build --backbone mobilenet_v2`
once per set (its build_seconds; includes the threshold calibration), then `patchcore eval --bank` per round
(images/s as it reports: decode excluded, resize/normalise included). Interleaved per round and set: official,
then this project. One `patchcore eval` at the default backbone per set after the rounds, for information.

DIR (optional) keeps this project's banks (<set>-mobilenet_v2.bank) between runs; an existing one is reused and
its recorded build_seconds reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from datadir import category as data_set  # bench/datadir.py
from results import patchcore_json, write_result  # bench/results.py

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = Path.home() / ".cache/torch/hub/checkpoints/mobilenet_v2-b0353104.pth"
LAYERS = ["features.6", "features.13"]

# The official side, run as `python -c CHILD OFFICIAL_SRC SET_FOLDER ROUNDS WEIGHTS`: one process per set that
# builds once and then answers one timed round per line read on stdin (so rounds interleave with this project's).
CHILD = r'''
import json, sys, time, types
official, folder, weights = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, official)
try:
    import timm  # noqa: F401  (official backbones.py imports it; unused with a model object)
except ImportError:
    sys.modules["timm"] = types.ModuleType("timm")
import numpy as np, torch, torchvision
import patchcore.common, patchcore.metrics, patchcore.patchcore, patchcore.sampler
from patchcore.datasets.mvtec import DatasetSplit, MVTecDataset
from pathlib import Path

assert Path(patchcore.__file__).resolve().is_relative_to(Path(official).resolve()), patchcore.__file__
np.random.seed(0); torch.manual_seed(0)  # its fix_seeds(0)
device = torch.device("cpu")
source, name = str(Path(folder).parent), Path(folder).name
backbone = torchvision.models.mobilenet_v2(weights=None)
backbone.load_state_dict(torch.load(weights, weights_only=True))
backbone.eval()
model = patchcore.patchcore.PatchCore(device)
model.load(backbone=backbone, layers_to_extract_from=__LAYERS__, device=device, input_shape=(3, 224, 224),
           pretrain_embed_dimension=1024, target_embed_dimension=1024, patchsize=3,
           featuresampler=patchcore.sampler.ApproximateGreedyCoresetSampler(0.1, device),
           anomaly_score_num_nn=1, nn_method=patchcore.common.FaissNN(False, 2))
train = MVTecDataset(source, name, resize=256, imagesize=224, split=DatasetSplit.TRAIN)
started = time.perf_counter()
model.fit(torch.utils.data.DataLoader(train, batch_size=2, shuffle=False, num_workers=0))
build = time.perf_counter() - started
bank = model.anomaly_scorer.nn_method.search_index.ntotal
test = MVTecDataset(source, name, resize=256, imagesize=224, split=DatasetSplit.TEST)
items = [test[i] for i in range(len(test))]  # decode + pre-process: outside the timing
images = torch.stack([item["image"] for item in items])
labels = [item["is_anomaly"] for item in items]
masks = np.stack([item["mask"].numpy() for item in items])[:, 0]
print(json.dumps({"ready": True, "build_seconds": round(build, 2), "bank": bank, "n_train": len(train),
                  "n_test": len(items)}), flush=True)
for line in sys.stdin:
    model.predict(images[:1])  # warm-up
    scores, maps = [], []
    started = time.perf_counter()
    for begin in range(0, len(images), 16):
        batch_scores, batch_maps = model.predict(images[begin:begin + 16])
        scores.extend(batch_scores); maps.extend(batch_maps)
    seconds = time.perf_counter() - started
    image_auroc = patchcore.metrics.compute_imagewise_retrieval_metrics(np.array(scores), labels)["auroc"]
    pixel_auroc = patchcore.metrics.compute_pixelwise_retrieval_metrics(np.stack(maps), masks)["auroc"]
    print(json.dumps({"images_per_second": len(images) / seconds, "image_auroc": float(image_auroc),
                      "pixel_auroc": float(pixel_auroc)}), flush=True)
'''.replace("__LAYERS__", repr(LAYERS))


class Official:
    """The official code in a child process for one data set: built at start, one timed round per `run()`."""

    def __init__(self, official: Path, folder: Path):
        self.process = subprocess.Popen([sys.executable, "-c", CHILD, str(official), str(folder), str(WEIGHTS)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
        self.info = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"official PatchCore failed (exit {self.process.wait()}); run CHILD by hand to see why")
        return json.loads(line)

    def run(self) -> dict:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def project_bank(folder: Path, banks: Path, name: str) -> tuple[Path, float]:
    """This project's mobilenet_v2 bank of a set (built unless kept in `banks`) and its build_seconds."""
    bank = banks / f"{name}-mobilenet_v2.bank"
    if not bank.is_file():
        done = subprocess.run([str(ROOT / ".venv/bin/patchcore"), "bank", "build", "--train",
                               str(folder / "train" / "good"), "--backbone", "mobilenet_v2", "--device", "cpu",
                               "--no-progress", "--out", str(bank)],
                              check=False, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"patchcore bank build failed: {done.stderr[-2000:]}")
    info = subprocess.run([str(ROOT / ".venv/bin/patchcore"), "bank", "info", str(bank)], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    return bank, float(json.loads(info)["info"]["build_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="src folder of the official checkout")
    parser.add_argument("--data", default=None, help="data root (default $PATCHCORE_DATA or ../shared/datasets)")
    parser.add_argument("--sets", default="mvtec_bottle,visa_macaroni1")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--banks", type=Path, default=None, help="folder keeping this project's banks")
    args = parser.parse_args()
    if not (args.official / "patchcore" / "patchcore.py").is_file():
        raise SystemExit(f"error: {args.official} has no patchcore/patchcore.py (the official src folder)")
    sets = [name for name in args.sets.split(",") if name]
    folders = {name: data_set(name, args.data) for name in sets}
    temporary = tempfile.TemporaryDirectory(prefix="vs-official-")
    banks = args.banks or Path(temporary.name)
    banks.mkdir(parents=True, exist_ok=True)
    officials, project = {}, {}
    runs = {(name, which): [] for name in sets for which in ("official", "this")}
    for _ in range(args.rounds):
        for name in sets:
            if name not in officials:
                officials[name] = Official(args.official, folders[name])
                print(json.dumps({"set": name, "implementation": "official", **officials[name].info}), flush=True)
            result = officials[name].run()
            runs[name, "official"].append(result)
            print(json.dumps({"set": name, "implementation": "official", **result}), flush=True)
            if name not in project:
                project[name] = project_bank(folders[name], banks, name)
            report = patchcore_json(ROOT, "eval", "--data", str(folders[name]), "--bank", str(project[name][0]),
                                    "--device", "cpu", "--no-progress")
            runs[name, "this"].append(report)
            print(json.dumps({"set": name, "implementation": "this", "images_per_second": report["images_per_second"],
                              "image_auroc": report["image_auroc"], "pixel_auroc": report["pixel_auroc"]}), flush=True)
    for one in officials.values():
        one.close()
    rows = []
    for name in sets:
        speed = {which: statistics.median(r["images_per_second"] for r in runs[name, which])
                 for which in ("official", "this")}
        common = {"set": name, "backbone": "mobilenet_v2", "rounds": args.rounds}
        official, this = runs[name, "official"][-1], runs[name, "this"][-1]
        rows.append({**common, "implementation": "official", "images_per_second": round(speed["official"], 2),
                     "build_seconds": officials[name].info["build_seconds"], "bank": officials[name].info["bank"],
                     "image_auroc": round(official["image_auroc"], 4), "pixel_auroc": round(official["pixel_auroc"], 4),
                     "runs": [round(r["images_per_second"], 2) for r in runs[name, "official"]]})
        rows.append({**common, "implementation": "this", "images_per_second": round(speed["this"], 2),
                     "build_seconds": round(project[name][1], 2), "bank": this.get("bank_size"),
                     "image_auroc": round(this["image_auroc"], 4), "pixel_auroc": round(this["pixel_auroc"], 4),
                     "pro": round(this["pro"], 4), "ratio": round(speed["this"] / speed["official"], 2),
                     "runs": [round(r["images_per_second"], 2) for r in runs[name, "this"]]})
        print(json.dumps(rows[-2]), flush=True)
        print(json.dumps(rows[-1]), flush=True)
    for name in sets:  # for information: this project at its default backbone (builds its own bank)
        report = patchcore_json(ROOT, "eval", "--data", str(folders[name]), "--device", "cpu", "--no-progress")
        rows.append({"set": name, "implementation": "this (default backbone)",
                     "backbone": report["backbone"], "bank": report.get("bank_size"),
                     "images_per_second": report["images_per_second"],
                     "build_seconds": report["fit_seconds"], "image_auroc": round(report["image_auroc"], 4),
                     "pixel_auroc": round(report["pixel_auroc"], 4), "pro": round(report["pro"], 4), "rounds": 1})
        print(json.dumps(rows[-1]), flush=True)
    write_result("vs_official", {"official": str(args.official), "rows": rows},
                 command=" ".join(["bench/vs_official.py", *sys.argv[1:]]))
    temporary.cleanup()


if __name__ == "__main__":
    main()
