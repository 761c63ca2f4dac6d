"""The `semiseg` command line: one console script, one subcommand per job.

Every subcommand is a thin shell over a Python function of the library, so the CLI and the
Python API do the same thing. Errors caused by the user's input print as one line. Each
subcommand imports its function when it runs, so `semiseg --help` starts fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from semiseg.engine.preemption import PREEMPTED_EXIT_STATUS, TrainingPreempted
from semiseg.errors import SemisegError
from semiseg.models.registry import META_ARCHITECTURES


def _synth(args: argparse.Namespace) -> None:
    from semiseg.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(args.out, num_train=args.train, num_val=args.val, seed=args.seed,
                            image_size=args.size, overwrite=args.overwrite, stuff=args.stuff)


def _split(args: argparse.Namespace) -> None:
    from semiseg.workflow import split

    split(args.ann, args.percent, args.out, seed=args.seed, unlabeled=args.unlabeled, from_lists=args.from_lists,
          images=args.images, allow_outside_root=args.allow_outside_root)


def _train(args: argparse.Namespace) -> None:
    from semiseg.workflow import train

    compile_override = [f"train.compile={args.compile}"] if args.compile else []
    train(args.config, *args.overrides, *compile_override, resume=args.resume)


def _eval(args: argparse.Namespace) -> None:
    from semiseg.workflow import evaluate

    evaluate(args.weights, *args.overrides, config=args.config, who=args.who, ann=args.ann, images=args.images,
             out=args.out)


def _predict(args: argparse.Namespace) -> None:
    from semiseg.api import predict_to_dir

    predict_to_dir(args.images, weights=args.weights, out_dir=args.out, score_threshold=args.score_threshold,
                   device=args.device, config=args.config, backend=args.backend, onnx=args.onnx,
                   compile=args.compile or "none")


def _export(args: argparse.Namespace) -> None:
    from semiseg.api import export_weights

    export_weights(args.weights, args.out, config=args.config)


def _convert(args: argparse.Namespace) -> None:
    from semiseg.weights import convert_checkpoint

    convert_checkpoint(args.src, args.dst, which=args.which)


def _demo(args: argparse.Namespace) -> None:
    from semiseg.demo import run_demo

    run_demo(out_dir=args.out, model=args.model, quick=args.quick, device=args.device, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semiseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="teacher -> student Guided Distillation on the built-in dataset")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    p.add_argument("--model", choices=list(META_ARCHITECTURES), default="mask2former")
    p.add_argument("--quick", action="store_true", help="a minutes-long smoke run (used by CI)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)

    p = sub.add_parser("synth", help="write the built-in synthetic COCO-format dataset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=800, help="number of training images (default 800)")
    p.add_argument("--val", type=int, default=500, help="number of validation images (default 500)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.add_argument("--stuff", action="store_true", help="stuff backgrounds (sky, wall, floor) and COCO panoptic "
                   "annotations too, for the panoptic and semantic tasks")
    p.set_defaults(func=_synth)

    p = sub.add_parser("split", help="seeded, nested labeled-percentage splits of a COCO json")
    p.add_argument("--ann", type=Path, required=True, help="instances json of the full training set")
    p.add_argument("--percent", type=float, nargs="*", default=[], help="e.g. 0.4 1 2 5 10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--unlabeled", action="store_true", help="also write the complementary unlabeled lists")
    p.add_argument("--from-lists", type=Path, nargs="+", default=None,
                   help="existing split lists (one image id or file name per line) instead of drawing")
    p.add_argument("--images", type=Path, default=None,
                   help="the image folder: also check that the images exist (as `semiseg train` does)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept file names leading outside the image folder (data.allow_outside_root)")
    p.set_defaults(func=_split)

    p = sub.add_parser("train", help="train from a YAML config (supervised or semi-supervised)")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="continue the run in the config's output folder")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training forward (default backend: inductor); = train.compile=BACKEND")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. solver.max_iter=500")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="COCO mask/box AP of a checkpoint on a dataset")
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--config", type=Path, default=None, help="default: the config saved beside the weights")
    p.add_argument("--who", choices=["student", "teacher", "both"], default="student")
    p.add_argument("--ann", type=Path, default=None, help="instances json (default: the config's val set)")
    p.add_argument("--images", type=Path, default=None, help="image folder of --ann")
    p.add_argument("--out", type=Path, default=None, help="write metrics JSON here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="segment images (the model's task): overlays + a json (+ panoptic / semantic PNGs)")
    p.add_argument("images", type=Path, nargs="+", help="image files or folders")
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", type=Path, default=None,
                   help="the model's config, for weights without an embedded one (converted official checkpoints)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="overlay threshold (json keeps all)")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", choices=["pytorch", "onnxruntime"], default="pytorch",
                   help="onnxruntime: run the file of `semiseg export` given with --onnx (CPU)")
    p.add_argument("--onnx", type=Path, default=None, help="the exported model, for --backend onnxruntime")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the PyTorch forward (default backend: inductor)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="the network of trained weights as ONNX (opset 18, dynamic batch and size)")
    p.add_argument("--weights", type=Path, required=True, help="weights file or checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write (must not exist)")
    p.add_argument("--config", type=Path, default=None, help="the model's config, for weights without one")
    p.set_defaults(func=_export)

    p = sub.add_parser("convert", help="official Mask2Former / Mask DINO / Guided Distillation checkpoint -> semiseg")
    p.add_argument("src", type=Path, help=".pkl (detectron2) or .pth checkpoint")
    p.add_argument("dst", type=Path, help="output .safetensors")
    p.add_argument("--which", choices=["auto", "teacher", "student"], default="auto",
                   help="model to take from a Guided Distillation checkpoint")
    p.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TrainingPreempted as e:
        print(f"semiseg: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_STATUS
    except SemisegError as e:
        print(f"semiseg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semiseg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
