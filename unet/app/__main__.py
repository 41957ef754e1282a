"""Start the web app: ``python -m unet.app --checkpoint runs/small/best.pt`` (see `unet.app`)."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

import torch
import uvicorn

from unet.app.segmentation import HEAD_OVAL
from unet.app.server import create_app
from unet.checkpoint import BEST_NAME, load_model
from unet.cli import number_type, positive_int
from unet.distributed import resolve_device

# Where `python -m unet.train` with no flags writes its best checkpoint (runs/<preset>, tiny).
DEFAULT_CHECKPOINT = Path("runs") / "tiny" / BEST_NAME
TRAIN_COMMAND = "python -m unet.train"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="A local web app: segment a photo, fix labels with one press",
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", default=None,
                        help=f"a checkpoint written by unet.train (default: the default run's {DEFAULT_CHECKPOINT})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=number_type(int, 0, True, "a port 0-65535", maximum=65535), default=8000,
                        help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for the network and the post-processing (default: torch's, one per "
                             "core; on a machine busy with other work, 1 may answer sooner)")
    parser.add_argument("--head-height", type=number_type(float, 0.0, False, "a fraction in (0, 0.9]", maximum=0.9),
                        default=HEAD_OVAL.height,
                        help="the head oval's height as a fraction of the model's input side: the typical head "
                             f"height in the training images (default {HEAD_OVAL.height}, measured on the "
                             "built-in data)")
    return parser


def find_checkpoint(path: str | None) -> Path:
    """The checkpoint to serve: `path`, or the default run's best.pt; a missing one says how to get it."""
    if path is not None:
        return Path(path)
    if DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT
    raise FileNotFoundError(
        f"no --checkpoint given and the default run's {DEFAULT_CHECKPOINT} does not exist (in {Path.cwd()}). "
        f"Train one with `{TRAIN_COMMAND}` (the tiny model on the built-in data, a few minutes on a CPU; "
        f"it writes {DEFAULT_CHECKPOINT}), or pass --checkpoint PATH to a best.pt or last.pt of another run")


def warm_up(model, device: torch.device) -> None:
    """One forward pass at the training size, so the first press of Segment does not pay for it."""
    size = model.config.image_size
    with torch.inference_mode():
        model(torch.zeros(1, 3, size, size, device=device))


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        checkpoint = find_checkpoint(args.checkpoint)
        device = resolve_device(args.device)
        model, _ = load_model(checkpoint, device)
        listener = socket.create_server((args.host, args.port))
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    warm_up(model, device)
    app = create_app(model, device, str(checkpoint), HEAD_OVAL.scaled(args.head_height))
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"unet.app: serving {checkpoint} ({model.config.image_size} px input, {device}) "
          f"at http://{shown}:{port}/  (Ctrl-C stops it)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=2))
    server.run(sockets=[listener])
    return 0


if __name__ == "__main__":
    sys.exit(main())
