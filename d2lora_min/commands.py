"""The `d2lora` console command: one entry point, a subcommand per tool, each with the same flag style
(`--name value` or `--name=value`, settings as `--section.field=value`, lists comma-separated, bools true/false).

    d2lora compare --methods lora,d2lora --seeds 0,1      d2lora tune --publish
    d2lora compare --preset replicate                     d2lora bench --quick
    d2lora pretrain --out runs/my_base                    d2lora tour
    d2lora compare --model DIR --tasks DIR                d2lora export adapter --model DIR --adapter RUN --out DIR

`d2lora <command> --help` lists each one's flags and settings.
"""

import importlib
import sys

COMMANDS = {
    "compare": (
        "d2lora_min.train.compare",
        "fine-tune the methods from one base and compare them (presets: ablate, replicate)",
    ),
    "tune": ("d2lora_min.train.tune", "each method's learning rate, on development seeds and validation items"),
    "bench": ("d2lora_min.train.bench", "speed and memory of every method, as ratios measured side by side"),
    "pretrain": ("d2lora_min.train.pretrain", "pretrain a base model"),
    "tour": ("d2lora_min.tour", "draw the pictures of docs/TOUR.md"),
    "export": ("d2lora_min.own.export", "Hugging Face folders: the base as OPT, adapters for PEFT; tasks as JSONL"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        listed = "\n".join(f"  {name:9s} {about}" for name, (_, about) in COMMANDS.items())
        print(f"usage: d2lora <command> [flags]\n\ncommands:\n{listed}", file=sys.stderr if argv else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module, _ = COMMANDS[argv[0]]
    return importlib.import_module(module).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
