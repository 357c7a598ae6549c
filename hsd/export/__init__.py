"""Export trained heads in the layouts serving engines load unchanged, validate them, publish them.

    from hsd.export import export_head, validate, push_to_hub
    result = export_head("runs/eagle3/smollm2-135m/final", "exports/smollm2-eagle3")   # validated
    push_to_hub(result.folder, "me/smollm2-135m-eagle3")                              # one commit

Modules: ``layout`` (the serving contract as data), ``source`` (a saved head folder and its run's
provenance), ``target`` (Hub id, revision, licence, dtype of the target), ``eagle3`` / ``early_exit``
(the exporters and, for EAGLE-3, :func:`load_exported_eagle3`), ``validate``, ``card`` (model card),
``hub`` (upload), ``cli`` (``scripts/export.py`` / ``hsd-train export``).
"""
from __future__ import annotations

import os

from hsd.export.eagle3 import ExportResult, export_eagle3, load_exported_eagle3
from hsd.export.early_exit import export_early_exit
from hsd.export.hub import push_to_hub
from hsd.export.layout import EAGLE3_KEYS, check_aux_ids
from hsd.export.source import ExportError, read_head_folder
from hsd.export.validate import ValidationError, ValidationReport, validate


def export_head(head_dir: str | os.PathLike, out_dir: str | os.PathLike | None, *, fmt: str = "native",
                decode_report=None, num_speculative_tokens: int | None = None, clean_process: bool = True,
                **kwargs) -> ExportResult:
    """Export any saved head folder: EAGLE-3 (``fmt`` native or speculators) or early-exit heads."""
    src = read_head_folder(head_dir)
    if src.kind == "eagle3":
        return export_eagle3(src, out_dir, fmt=fmt, decode_report=decode_report,
                             num_speculative_tokens=num_speculative_tokens, clean_process=clean_process, **kwargs)
    if fmt != "native":
        raise ExportError(f"--format {fmt} applies to EAGLE-3 heads only; {head_dir} holds early-exit heads")
    if decode_report is not None:
        raise ExportError("--decode-report applies to EAGLE-3 heads only")
    return export_early_exit(src, out_dir, **kwargs)


__all__ = ["EAGLE3_KEYS", "ExportError", "ExportResult", "ValidationError", "ValidationReport", "check_aux_ids",
           "export_early_exit", "export_eagle3", "export_head", "load_exported_eagle3", "push_to_hub",
           "read_head_folder", "validate"]
