"""`megalite convert`: Hugging Face directory -> megalite weights, and megalite checkpoint -> Hugging Face."""

from __future__ import annotations

import argparse

from megalite.commands.output import emit

HELP = "convert between Hugging Face and megalite checkpoints"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalite convert`."""
    parser.add_argument("--from-hf", metavar="DIR", help="a Hugging Face GPT-2 or Llama directory (safetensors)")
    parser.add_argument("--out", metavar="DIR", help="where to write model.json + model.safetensors")
    parser.add_argument("--vocab-multiple", type=int, default=128, metavar="N",
                        help="pad the vocabulary to a multiple of N (default 128; every TP degree must divide it)")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="a megalite checkpoint (step directory, checkpoint root or run directory) of any layout")
    parser.add_argument("--to-hf", metavar="DIR", help="with --checkpoint: write a Hugging Face directory here")


def main(args: argparse.Namespace) -> int:
    """Run the conversion the arguments ask for; returns the exit status."""
    from megalite.errors import ConfigError

    if getattr(args, "checkpoint", None):
        if not args.to_hf:
            raise ConfigError("--checkpoint needs --to-hf DIR")
        from megalite.interop.export import export_hf

        out = export_hf(args.checkpoint, args.to_hf)
        emit(f"wrote {out}: loads with transformers.AutoModelForCausalLM.from_pretrained")
        return 0
    if not getattr(args, "from_hf", None):
        raise ConfigError("nothing to do; give --from-hf DIR --out DIR, or --checkpoint DIR --to-hf DIR")
    if not args.out:
        raise ConfigError("--from-hf needs --out DIR")
    from megalite.config import count_parameters
    from megalite.interop.hf import from_hf
    from megalite.interop.native import save_weights

    model = from_hf(args.from_hf, make_vocab_size_divisible_by=args.vocab_multiple)
    out = save_weights(model, args.out, tokenizer_dir=args.from_hf, write=True)
    n = count_parameters(model.config)["total"]
    emit(f"wrote {out} ({n:,} parameters, vocabulary {model.config.vocab_size} padded to "
          f"{model.config.padded_vocab_size}); use it as the run's model with `\"model\": \"{out}/model.json\"`")
    return 0
