"""The `featx` command line: thin typer commands over the library, one module per stage."""

from featx.cli.app import app  # noqa: I001 (the import order is the order of `featx --help`)
from featx.cli.extract import extract, merge
from featx.cli.export import export  # noqa: F401 (registers `featx export`)
from featx.cli.classify import evaluate, fit, predict
from featx.cli.probe import probe
from featx.cli.engines import engines  # noqa: F401 (registers `featx engines`)
from featx.cli.finetune import augment_preview, finetune, lr_find
from featx.cli.show import backbones, classifiers, info, layers, report, runs

__all__ = [
    "app",
    "augment_preview",
    "backbones",
    "classifiers",
    "evaluate",
    "extract",
    "finetune",
    "fit",
    "info",
    "layers",
    "lr_find",
    "merge",
    "predict",
    "probe",
    "report",
    "runs",
]
