"""``dynalora adapters import|list|export`` and ``dynalora info``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dynalora.data.text_sources import SOURCE_FORMS
from dynalora.models import DEFAULT_MODEL_NAME, DTYPES, dynalora_home


def default_bank_dir() -> Path:
    return dynalora_home() / "banks" / "default"


def add_model_arguments(parser: argparse.ArgumentParser, bank: bool = True) -> None:
    parser.add_argument("--model", default=None,
                        help=f"base model: HF id or folder (default: the embedded {DEFAULT_MODEL_NAME}; "
                             "'tiny:llama' for a random test model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="the base model's weights and LoRA state (default: %(default)s)")
    if bank:
        parser.add_argument("--bank", type=Path, default=None,
                            help="bank folder (default: $DYNALORA_HOME/banks/default)")


def load_model_and_bank(args, require_bank: bool = False):
    """(BaseModel, LoraBank) from ``--model`` and ``--bank`` (a bank folder or a trained library); an absent default
    bank is an empty bank."""
    from dynalora.lora import LoraBank, module_shapes_of
    from dynalora.lora.bank import is_bank_folder
    from dynalora.lora.library_folder import load_library_bank
    from dynalora.models import load_base_model

    base = load_base_model(args.model, args.dtype, args.device)
    shapes = module_shapes_of(base.model)
    bank_dir = args.bank or default_bank_dir()
    if is_bank_folder(bank_dir) or (bank_dir / "library.json").is_file():
        bank = load_library_bank(bank_dir, base.model)[0]
    elif require_bank or args.bank is not None and args.bank.exists():
        raise FileNotFoundError(f"{bank_dir}: not a bank folder (no bank.json); create it with "
                                "`dynalora adapters import PEFT_FOLDER --label NAME`")
    else:
        bank = LoraBank(shapes)
    return base, bank, bank_dir


def parse_blend(text: str, labels: list[str]) -> dict[str, float]:
    """``"news=0.7,scripture=0.3"`` → ``{"news": 0.7, "scripture": 0.3}`` (labels checked)."""
    from dynalora.lora.bank import blend_from_text

    weights = blend_from_text(text, "--blend")
    for label in weights:
        if label not in labels:
            raise ValueError(f"--blend: unknown adapter {label!r}; the bank holds {labels}")
    return weights


def cmd_import(args) -> int:
    base, bank, bank_dir = load_model_and_bank(args)
    folders = args.folders
    if (args.label or args.data) and len(folders) > 1:
        raise ValueError("--label and --data describe one adapter; import several folders one at a time with them")
    for folder in folders:
        info = bank.add_peft(folder, label=args.label or Path(folder).name, description=args.description,
                             data=args.data)
        print(f"imported {info.label!r}: rank {info.rank}, {len(info.modules)} modules, from {folder}")
    bank.save(bank_dir)  # written only after every folder imported cleanly
    print(f"bank {bank_dir}: {len(bank)} adapters")
    return 0


def cmd_list(args) -> int:
    from dynalora.lora.bank import BANK_INDEX

    bank_dir = args.bank or default_bank_dir()
    index_path = bank_dir / BANK_INDEX
    if not index_path.is_file():
        print(f"no bank at {bank_dir} (import adapters with `dynalora adapters import`)")
        return 0
    adapters = json.loads(index_path.read_text())["adapters"]
    if args.json:
        print(json.dumps(adapters, indent=2))
        return 0
    print(f"bank {bank_dir}: {len(adapters)} adapters")
    print(f"{'label':<24} {'rank':>4} {'modules':>7}  description")
    for entry in adapters:
        print(f"{entry['label']:<24} {entry['rank']:>4} {len(entry['modules']):>7}  {entry['description']}")
    return 0


def cmd_export(args) -> int:
    from dynalora.lora import DynamicLoraModel

    base, bank, _ = load_model_and_bank(args, require_bank=args.state is None)
    dyn = DynamicLoraModel.attach(base.model, bank)
    if args.state:
        dyn.state.load(args.state)
    if args.blend:
        dyn.state.set_blend_by_label(args.row, parse_blend(args.blend, bank.labels))
    report = dyn.export_peft(args.row, args.out, rank=args.rank)
    kind = "exact" if report.exact else f"SVD rank {report.rank}, relative error {report.relative_error:.2e} " \
                                         f"(worst {report.worst_module}: {report.worst_module_error:.2e})"
    print(f"exported row {args.row} to {args.out}: rank {report.rank}, {kind}")
    return 0


def cmd_info(args) -> int:
    from dynalora.lora import DynamicLoraModel, InjectConfig

    base, bank, bank_dir = load_model_and_bank(args)
    parameters = sum(p.numel() for p in base.model.parameters())
    dyn = DynamicLoraModel.attach(base.model, bank, InjectConfig(target_modules=args.targets))
    if args.state:
        dyn.state.load(args.state)
    print(f"model     {base.name}: {type(base.model).__name__}, {parameters / 1e6:.1f}M parameters")
    leaves = sorted({m.split(".")[-1] for m in dyn.target_modules})
    print(f"targets   {len(dyn.target_modules)} layers ({', '.join(leaves)})")
    print(f"bank      {bank_dir if len(bank) else '(empty)'}: {len(bank)} adapters, rank slots {bank.rank}")
    for info in bank.adapters:
        print(f"  {info.label:<22} r={info.rank:<3} {len(info.modules):>4} modules  {info.description}")
    state = dyn.state
    print(f"state     max_batch={state.max_batch}, generated_rank={state.config.generated_rank}, "
          f"memory_rank={state.config.memory_rank}")
    for row in range(state.max_batch):
        weights = state.blend_weights[row]
        rows_in_use = [k for k in ("generated", "memory") if state.row_factors(row, k)]
        if weights.any() or rows_in_use:
            blend = ", ".join(f"{label}={w:.3g}" for label, w in zip(state.labels, weights.tolist()) if w)
            print(f"  row {row}: blend [{blend or '-'}] factors {rows_in_use or '-'}")
    return 0


def add_adapter_commands(commands) -> None:
    adapters = commands.add_parser("adapters", help="manage the bank of LoRA adapters")
    sub = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")

    p = sub.add_parser("import", help="import PEFT LoRA folders into a bank")
    p.add_argument("folders", nargs="+", help="PEFT adapter folders (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--label", default=None, help="label of the adapter (default: the folder name)")
    p.add_argument("--description", default="", help="one-line description of what the adapter is for")
    p.add_argument("--data", default="", metavar="SOURCE",
                   help=f"where the adapter's text is, for training the shift network and trigger over the bank: "
                        f"{SOURCE_FORMS}")
    add_model_arguments(p)
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("list", help="list the adapters of a bank")
    p.add_argument("--bank", type=Path, default=None, help="bank folder (default: $DYNALORA_HOME/banks/default)")
    p.add_argument("--json", action="store_true", help="print the bank index as JSON")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("export", help="export a blend (or a saved state's row) as a PEFT adapter folder")
    p.add_argument("--blend", default=None, help="LABEL=WEIGHT,... (e.g. news=0.7,scripture=0.3)")
    p.add_argument("--state", type=Path, default=None, help="a state file saved by dynalora (safetensors)")
    p.add_argument("--row", type=int, default=0, help="which row of the state to export (default 0)")
    p.add_argument("--rank", type=int, default=None, help="compress to this rank by SVD (default: exact)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_model_arguments(p)
    p.set_defaults(handler=cmd_export)


def add_info_command(commands) -> None:
    p = commands.add_parser("info", help="show the model, its target modules, the bank and a state")
    add_model_arguments(p)
    p.add_argument("--state", type=Path, default=None, help="a state file to summarise")
    p.add_argument("--targets", nargs="+", default=None, help="target module suffixes (default: attention + bank)")
    p.set_defaults(handler=cmd_info)
