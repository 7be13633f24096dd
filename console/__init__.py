"""The operator console: a small web app over Redis (through `contracts` only), live by Server-Sent Events."""
