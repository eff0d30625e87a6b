"""What a merge method is (`MergeMethod`), its settings (`Knob`), and how methods are found."""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Knob:
    """One setting a method reads: `name` on the command line (`k=20`), `arg` in Python (the
    keyword of `merge`), its default and its range. `many`: a comma list (λ's grid)."""

    name: str
    arg: str
    default: Any
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    many: bool = False
    help: str = ""

    def parse(self, text: str):
        """The value of `name=text`; ValueError with a one-line reason when it is not valid."""
        parts = [p.strip() for p in text.split(",")] if self.many else [text.strip()]
        if not all(parts):
            raise ValueError(f"{self.name}={text}: empty value; {self.expected()}")
        values = []
        for part in parts:
            if self.kind is str:
                value = part
            else:
                try:
                    value = self.kind(part)
                except ValueError:
                    raise ValueError(f"{self.name}={text}: not a number; {self.expected()}") from None
            self.check(value, text)
            values.append(value)
        return tuple(values) if self.many else values[0]

    def check(self, value, text: str | None = None) -> None:
        shown = f"{self.name}={value if text is None else text}"
        if self.choices and value not in self.choices:
            raise ValueError(f"{shown}: {self.expected()}")
        if self.kind in (float, int):
            if not math.isfinite(value):
                raise ValueError(f"{shown}: out of range; {self.expected()}")
            below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if below or above:
                raise ValueError(f"{shown}: out of range; {self.expected()}")

    def describe(self) -> str:
        """One line for --help: the range (or choices), what it is, its default."""
        if self.choices:
            allowed = "|".join(self.choices)
        elif self.kind in (float, int):
            low = "" if self.low is None else f"{self.low:g} {'<' if self.low_open else '≤'} "
            high = "" if self.high is None else f" {'<' if self.high_open else '≤'} {self.high:g}"
            allowed = f"{low}{self.name}{high}" if low or high else "a number"
        else:
            allowed = "a value"
        default = "each method's grid, chosen on validation" if self.default is None else f"{self.default:g}" \
            if isinstance(self.default, float) else self.default
        return f"{self.name}=…  {allowed}{', a comma list' if self.many else ''}: {self.help} (default {default})"

    def expected(self) -> str:
        if self.choices:
            return f"choose one of {', '.join(self.choices)}"
        low = "" if self.low is None else f"{self.low:g} {'<' if self.low_open else '≤'} "
        high = "" if self.high is None else f" {'<' if self.high_open else '≤'} {self.high:g}"
        what = {int: "an integer", float: "a number"}.get(self.kind, "a value")
        listed = " (or a comma list)" if self.many else ""
        return f"{self.name} must be {what}{listed}, {low}{self.name}{high}".rstrip(", ") + (
            f" ({self.help})" if self.help else "")


# λ: the scale of a merged task vector, θ = θ₀ + λ·τ_m. Null: the method's own grid, chosen on
# the tasks' validation sets.
LAMBDA = Knob("lambda", "lam", None, float, low=0.0, low_open=True, many=True,
              help="the scale of the merged task vector")


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: `merge(start, finetuned, *, stats=None, **knobs) -> dict` (see the package
    docstring), its settings, the statistics it needs per task, and, for a method that scales a
    merged task vector (`scaled`), `vector(...)` = τ_m and its default λ grid."""

    name: str  # method=<name>
    title: str  # its row in merge.md
    formula: str  # one line, for merge.md's Methods section
    merge: Callable[..., dict]
    knobs: tuple[Knob, ...] = ()
    statistics: tuple[str, ...] = ()  # "fisher", "gram": computed per task by the command
    vector: Callable[..., dict] | None = None
    grid: Callable[[dict], tuple[float, ...]] | None = None  # knobs → λ grid (scaled methods)
    seeded: bool = False  # True: merge/vector take `seed` (the command passes the runs' seed)
    order: int = 100  # where its row goes (small first)
    reference: str = ""  # the paper
    extra: dict = field(default_factory=dict)

    @property
    def scaled(self) -> bool:
        return self.vector is not None

    def defaults(self) -> dict:
        return {k.arg: k.default for k in self.knobs}

    def lambda_grid(self, knobs: dict) -> tuple[float, ...]:
        """The λ values tried on validation: the user's `lambda=`, else the method's grid."""
        chosen = knobs.get(LAMBDA.arg)
        return tuple(chosen) if chosen else self.grid(knobs)


def grid(start: float, stop: float, step: float) -> tuple[float, ...]:
    """start, start+step, ..., stop (inclusive), rounded to the step's decimals."""
    count = int(round((stop - start) / step)) + 1
    return tuple(round(start + i * step, 10) for i in range(count))


def methods() -> dict[str, MergeMethod]:
    """Every method of this package, by name, in row order: the `METHOD` of each module."""
    import transferlab.merging as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, MergeMethod):
            found.append(method)
    return {m.name: m for m in sorted(found, key=lambda m: (m.order, m.name))}


def get(name: str) -> MergeMethod:
    known = methods()
    if name not in known:
        raise KeyError(f"method={name}: no such merge method; choose one of {', '.join(known)} or all")
    return known[name]
