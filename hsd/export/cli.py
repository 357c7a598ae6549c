"""Export a trained head to the Hub layout vLLM and SGLang load, validate it, optionally push it.

Command line of the exporter (``scripts/export.py`` and ``hsd-train export``).

    python scripts/export.py HEAD_DIR --out OUT_DIR [--dtype bfloat16|float16|float32]
        [--format native|speculators] [--target NAME_OR_DIR] [--push-to-hub REPO_ID [--private]
        [--revision BRANCH]] [--dry-run] [--decode-report REPORT.json] [--overwrite]

Exit code 0 only when the exported folder passed validation (and, with ``--push-to-hub``, was uploaded);
1 for a failed validation, a bad input or a failed upload (the message names the problem); 2 for bad
arguments. ``--dry-run`` builds and validates the folder in a temporary place and prints the files that
would be written and uploaded and the model card; it writes and uploads nothing.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hsd.config import program_name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name(),
        description="Export a trained head (EAGLE-3 or early-exit) to a Hub-ready folder that vLLM and SGLang "
                    "load unchanged; validate it; optionally push it to the Hugging Face Hub.")
    p.add_argument("head_dir", help="saved head folder: runs/<task>/<name>/final, best/ or checkpoints/step_N/model")
    p.add_argument("--out", help="output folder (required unless --dry-run)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="floating weights dtype (default: the target's serving dtype, bfloat16 for most)")
    p.add_argument("--format", dest="fmt", choices=["native", "speculators"], default="native",
                   help="native: LlamaForCausalLMEagle3, loads in vLLM and SGLang (default); speculators: the "
                        "vLLM speculators twin (`vllm serve DIR` alone). EAGLE-3 only")
    p.add_argument("--target", help="target short name, folder or Hub id (default: the one the run recorded)")
    p.add_argument("--target-hub-id", help="Hub id of the target for the card and the serving commands "
                                           "(default: derived from --target)")
    p.add_argument("--target-revision", help="target commit to record (default: the run's, a Hub-cache snapshot's, "
                                             "or a sha256 of the target's weight files)")
    p.add_argument("--decode-report", help="JSON report of scripts/decode.py: its measured τ goes into the card")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="draft tokens per step in the serving commands (default: the run's ttt_steps)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the exported folder to this Hub repository")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    p.add_argument("--revision", help="Hub branch to commit to (created when missing; default: main)")
    p.add_argument("--dry-run", action="store_true",
                   help="build and validate in a temporary folder; print the file list and the card; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--no-clean-process-check", action="store_true",
                   help="skip the fresh-interpreter AutoConfig load (faster; the upload re-validates fully)")
    return p


def _print_files(files: dict[str, int], header: str) -> None:
    print(header)
    for name, size in files.items():
        print(f"  {name:<32} {size:>14,d} bytes")


def engine_warning(head_dir: str, target: str | None) -> str | None:
    """One warning line when the hsd decode engine will refuse the head's target, else None.

    The decode engine's self-check (:mod:`hsd.decode.target_check`) as the training run recorded it
    (``target_check.json`` near the head, for the same target); without a record, the check itself on the
    loaded target. The export goes on either way: vLLM and SGLang run the target's own forward.
    """
    from hsd.decode import target_check
    from hsd.export.source import read_head_folder

    try:
        src = read_head_folder(head_dir)
    except ValueError:
        return None  # export_head reports the bad folder
    name = target or src.target_name
    record = target_check.read_record(src.folder)
    if record is not None and record.get("target") == name:
        return target_check.engine_warning(record, "the export goes on")
    if not name:
        return None
    try:
        from hsd.models.resolve import load_target

        model, _ = load_target(name, dtype="auto", device="cpu")
    except (OSError, ValueError, RuntimeError) as err:
        return f"note: the decode engine's check of target {name!r} did not run ({type(err).__name__}: {err})"
    return target_check.engine_warning(target_check.check_target(model), "the export goes on")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the exporter; returns the process exit code (see the module docstring)."""
    from hsd.export import export_head
    from hsd.export.hub import push_to_hub
    from hsd.export.source import ExportError
    from hsd.export.validate import ValidationError

    args = build_parser().parse_args(argv)
    if not args.out and not args.dry_run:
        print("error: --out OUT_DIR is required (or --dry-run)", file=sys.stderr)
        return 2
    if (args.private or args.revision) and not args.push_to_hub:
        print("error: --private and --revision need --push-to-hub REPO_ID", file=sys.stderr)
        return 2
    warning = engine_warning(args.head_dir, args.target)
    if warning:
        print(warning, file=sys.stderr)
    try:
        result = export_head(args.head_dir, None if args.dry_run else args.out, dtype=args.dtype, fmt=args.fmt,
                             target=args.target, target_hub_id=args.target_hub_id,
                             target_revision=args.target_revision, decode_report=args.decode_report,
                             repo_id=args.push_to_hub, num_speculative_tokens=args.num_speculative_tokens,
                             overwrite=args.overwrite, clean_process=not args.no_clean_process_check)
    except ValidationError as err:
        print(f"export failed validation: {err}", file=sys.stderr)
        return 1
    except ExportError as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    report = result.report
    print(f"validated ({report.kind}, {report.fmt}):")
    for line in report.checks:
        print(f"  ok  {line}")
    for line in report.notes:
        print(f"  note {line}")
    if args.dry_run:
        _print_files(result.files, "dry run: files that would be written"
                     + (f" and uploaded to {args.push_to_hub}" if args.push_to_hub else "") + ":")
        print("\n" + "=" * 30 + " README.md (model card) " + "=" * 30)
        print(result.card)
        return 0
    _print_files(result.files, f"exported to {result.folder}:")
    if args.push_to_hub:
        try:
            plan = push_to_hub(result.folder, args.push_to_hub, private=args.private, revision=args.revision,
                               validated=not args.no_clean_process_check)
        except ExportError as err:
            print(f"push failed: {err}", file=sys.stderr)
            return 1
        print(f"pushed {len(plan.files)} files to {args.push_to_hub} in one commit: {plan.commit_url}")
        if plan.skipped:
            print(f"  not uploaded (not part of an export): {plan.skipped}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
