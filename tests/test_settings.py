"""featx.settings: options declared once on a dataclass, checked once."""

from __future__ import annotations

import dataclasses
import enum
import math
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

from featx.errors import UsageError
from featx.settings import (
    INT64_MAX,
    Device,
    batch_size_option,
    check_settings,
    choices_of,
    device_option,
    flag_of,
    machine_workers,
    option,
    option_spec,
    seed_option,
    trust_pickle_option,
    workers_option,
)


class Engine(str, enum.Enum):
    auto = "auto"
    eager = "eager"


@dataclasses.dataclass(frozen=True)
class Example:
    batch_size: int | None = option(None, "Images per pass.", minimum=1, maximum=4096)
    fraction: float = option(0.2, "Held out.", minimum=0, maximum=1, above=True, below=True)
    lr: float = option(1e-4, "Learning rate.", minimum=0, above=True)
    seed: int = option(0, "Seed.", minimum=0)
    workers: int = option(0, "Processes.", minimum=0, maximum=machine_workers)
    engine: Engine = option(Engine.auto, "What runs it.", common=True)
    pool: Literal["avg", "max"] = option("avg", "Pooling.", flag="pooling")
    layers: list[str] = option(["a"], "Layers.")
    sizes: list[int] = option([1], "Sizes.", minimum=1)
    quiet: bool = option(False, "Quiet.")
    store: Path | None = option(None, "Store.", metavar="FILE")
    command: str = ""  # not an option: never checked, never on the command line


def refused(**changes) -> str:
    with pytest.raises(UsageError) as caught:
        check_settings(dataclasses.replace(Example(), **changes))
    return str(caught.value)


def test_defaults_pass_and_plain_fields_are_not_checked():
    check_settings(Example())
    check_settings(Example(command=None))  # type: ignore[arg-type]


def test_the_field_records_the_option():
    fields = {f.name: f for f in dataclasses.fields(Example)}
    assert flag_of(fields["batch_size"]) == "batch-size"
    assert flag_of(fields["pool"]) == "pooling"
    assert option_spec(fields["engine"]).common
    assert option_spec(fields["store"]).metavar == "FILE"
    assert option_spec(fields["command"]) is None
    assert Example().layers == ["a"] and Example().layers is not Example().layers


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, "--batch-size must be at least 1 and at most 4096, not 0."),
        ({"batch_size": 5000}, "--batch-size must be at least 1 and at most 4096, not 5000."),
        ({"batch_size": 10**20}, "--batch-size must be at most 4096, not 100000000000000000000."),
        ({"batch_size": 2.5}, "--batch-size must be a whole number, not 2.5."),
        ({"batch_size": True}, "--batch-size must be a number, not True."),
        ({"fraction": 1.0}, "--fraction must be between 0 and 1, not 1."),
        ({"lr": math.inf}, "--lr must be a finite number, not inf."),
        ({"lr": math.nan}, "--lr must be a finite number, not nan."),
        ({"lr": 0.0}, "--lr must be above 0, not 0."),
        ({"seed": -1}, "--seed must be at least 0, not -1."),
        ({"seed": 2**63}, f"--seed must be at most {INT64_MAX}, not {2**63}."),
        ({"engine": "turbo"}, "--engine must be one of auto, eager, not 'turbo'."),
        ({"pool": "median"}, "--pooling must be one of avg, max, not 'median'."),
        ({"sizes": [1, 0]}, "--sizes must be at least 1, not 0."),
        ({"layers": "a"}, "--layers must be a list, not 'a'."),
        ({"quiet": "yes"}, "--quiet must be true or false, not 'yes'."),
        ({"fraction": None}, "--fraction needs a value."),
    ],
)
def test_bad_values_are_refused_in_one_sentence(changes, message):
    assert refused(**changes) == message


def test_a_bound_from_the_machine():
    assert machine_workers() >= 4
    check_settings(Example(workers=machine_workers()))
    message = refused(workers=99999999999999999999)
    assert message == f"--workers must be at most {machine_workers()}, not 99999999999999999999."


def test_choices_accept_the_enum_or_its_value():
    check_settings(Example(engine=Engine.eager))
    check_settings(Example(engine="eager"))  # type: ignore[arg-type]
    assert choices_of(Engine | None) == ["auto", "eager"]
    assert choices_of(Literal["avg", "max"]) == ["avg", "max"]
    assert choices_of(int) is None


def test_not_a_settings_object():
    with pytest.raises(TypeError):
        check_settings(Example)


def test_importing_settings_imports_neither_torch_nor_typer():
    code = "import sys, featx.settings; print('torch' in sys.modules, 'typer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@dataclasses.dataclass(frozen=True)
class Shared:
    device: Device = device_option()
    workers: int | None = workers_option()
    batch_size: int | None = batch_size_option()
    trust_pickle: bool = trust_pickle_option()
    seed: int = seed_option()


def test_the_shared_options():
    check_settings(Shared())
    check_settings(Shared(device="cuda", workers=0, batch_size=1, seed=2**32 - 1))
    for changes, start in [
        ({"device": "tpu"}, "--device must be one of auto, cpu, cuda, mps"),
        ({"workers": 10**20}, "--workers must be at most"),
        ({"batch_size": 10**20}, "--batch-size must be at most 65536, not 1000"),
        ({"seed": 2**32}, "--seed must be at least 0 and at most"),
    ]:
        with pytest.raises(UsageError, match="^" + start):
            check_settings(dataclasses.replace(Shared(), **changes))
