"""What a rule is: the one definition every layer of fusedwd derives from.

A ``Rule`` names its states (in segment-table column order, each with the
signedness of its 8-bit code and the switch it exists under), its structural
switches (which decide the states, so they are part of the bucket key and
compile-time constants of the kernels), its hyperparameter row (column names in
the kernels' order), its defaults and validation, and its math: the reference
function and the Triton helpers. The C++ side (csrc/include/fusedwd/<rule>.h)
is checked against it at one point, tests/test_layout.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

from .._spec import decay_row

# The columns every rule's row holds, resolved from the group by _spec.decay_row:
# the learning rate and the decay mode reduced to two numbers (docs/math.md#weight-decay-modes).
SHARED_COLUMNS = ("lr", "decay_mult", "l2", "grad_sign")
MAX_STATES = 3  # segment-table columns SEG_S0..SEG_S2


@dataclass(frozen=True)
class State:
    """One per-parameter state, as torch's state_dict names it."""

    name: str  # "exp_avg": the key in optimizer.state[p], its op argument is name + "s"
    signed: bool  # its 8-bit code: signed (m, momentum) or unsigned (second moments, >= 0)
    when: Optional[str] = None  # the switch it exists under; None: always


@dataclass(frozen=True)
class Switch:
    """A structural option: it decides which states exist, so kernels take it as a constant."""

    name: str  # the kernels' and the op's argument name ("amsgrad", "has_momentum")
    of: Callable[[Mapping[str, Any]], bool]  # its value for a param group


class PhaseHelpers(NamedTuple):
    """A two-phase rule's Triton helpers, plain functions that fusedwd.triton compiles
    (docs/adding-a-rule.md#triton; the C++ copy's functions of the same names in
    csrc/include/fusedwd/<rule>.h). Each computes its per-segment scalars from the
    hyperparameter row ``hp`` and the step ``t`` in float64 and rounds them once to the math type.

    - ``reads_p(hp)``: whether phase 1 needs p (a scalar bool; else it is not loaded, and 0);
    - ``moments(p, g, s0, s1, hp, t, grad_mult, MATH) -> p, g, s0, s1``: phase 1's element math,
      the new states and the p and g the terms read;
    - ``terms(p, g, s0, s1, hp, t, MATH) -> (term, ...)``: each sum's float64 term of an element,
      from the states as stored, one per name of ``Rule.sums`` (a second, unused one where the
      rule has one sum: the kernel always takes two);
    - ``apply_scalars(hp, t, sum0, sum1, n, MATH) -> (scalar, ...)``: phase 2's per-segment scalars
      from the segment's sums (float64) and its element count n, formed before any element is
      loaded (their float64 divisions and square roots are calls on NVIDIA GPUs);
    - ``apply(p, s0, s1, scalars) -> p``: phase 2's element math.
    """

    reads_p: Callable
    moments: Callable
    terms: Callable
    apply_scalars: Callable
    apply: Callable


@dataclass(frozen=True)
class Rule:
    """An update rule, defined once (docs/adding-a-rule.md).

    ``reference(group, structure, params, grads, states, steps, precision)`` steps one
    group's tensors with fusedwd.reference's semantics (``states``: name -> tensors, only
    the states the structure keeps). ``values(group)`` gives the rule's own columns of the
    hyperparameter row; the shared ones (lr, decay_mult, l2, grad_sign) come from the
    decay mode; a rule may override one of them (LAMB's decoupled decay lives inside its
    trust ratio, so its ``decay_mult`` is 1). ``triton_scalars`` and ``triton_update`` are
    the rule's Triton helpers, plain functions that fusedwd.triton compiles
    (docs/adding-a-rule.md#triton); a rule without them has no Triton kernel.
    A two-phase rule has ``triton_phases`` instead (``PhaseHelpers``).

    ``sums`` names the per-tensor sums of a two-phase rule (LAMB, StableAdamW;
    docs/design.md#per-tensor-reductions): its first phase updates the states and sums
    these over each tensor, its second applies an update scaled by what they give.
    An elementwise rule has none. ``means`` names those of them that phase 2 divides
    by the tensor's element count: on a shard (FSDP2) that count must be the whole
    tensor's, not the shard's (fusedwd/optim/_dtensor.py).
    """

    name: str
    states: tuple[State, ...]
    switches: tuple[Switch, ...]
    columns: tuple[str, ...]
    defaults: Mapping[str, Any]
    values: Callable[[Mapping[str, Any]], Mapping[str, float]]
    check: Callable[[Mapping[str, Any]], None]
    reference: Callable[..., None]
    step_in_state: bool = True  # torch keeps `step` in the state (AdamW, RMSprop; not SGD)
    triton_scalars: Optional[Callable] = None
    triton_update: Optional[Callable] = None
    triton_phases: Optional[PhaseHelpers] = None
    sums: tuple[str, ...] = ()
    means: tuple[str, ...] = ()
    _switch_index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.states) > MAX_STATES:
            raise ValueError(f"rule {self.name!r}: at most {MAX_STATES} states (SEG_S0..SEG_S2)")
        missing = [c for c in SHARED_COLUMNS if c not in self.columns]
        if missing or len(set(self.columns)) != len(self.columns):
            raise ValueError(f"rule {self.name!r}: columns must be unique and include {SHARED_COLUMNS}")
        if not set(self.means) <= set(self.sums):
            raise ValueError(f"rule {self.name!r}: means {self.means} must be among its sums {self.sums}")
        index = {s.name: k for k, s in enumerate(self.switches)}
        for state in self.states:
            if state.when is not None and state.when not in index:
                raise ValueError(f"rule {self.name!r}: state {state.name!r} exists under an unknown switch")
        object.__setattr__(self, "_switch_index", index)

    # --------------------------------------------------------------- structure
    def structure(self, group: Mapping[str, Any]) -> tuple[bool, ...]:
        """The group's switches, in order: part of the bucket key, the kernels' constants."""
        return tuple(bool(s.of(group)) for s in self.switches)

    def slots(self, structure: Sequence[bool]) -> tuple[Optional[str], ...]:
        """Per state column (S0, S1, ...): the state's name, or None where this structure keeps none."""
        return tuple(s.name if s.when is None or structure[self._switch_index[s.when]] else None
                     for s in self.states)

    def structures(self) -> list[tuple[bool, ...]]:
        """Every combination of the switches (the kernels compile one variant each)."""
        out: list[tuple[bool, ...]] = [()]
        for _ in self.switches:
            out = [s + (b,) for s in out for b in (False, True)]
        return out

    # ------------------------------------------------------------ hyper row
    def hyper_row(self, group: Mapping[str, Any], device: Any = None) -> list[Any]:
        """The group's row of the hyperparameter table, in ``columns`` order
        (docs/design.md#hyperparameter-table).

        With ``device``, a tensor lr is not read on the host: the entries that depend on
        it are float64 0-dim tensors on ``device`` (see _spec.decay_row).
        """
        lr, decay_mult, l2, grad_sign = decay_row(group, device)
        values = dict(dict(lr=lr, decay_mult=decay_mult, l2=l2, grad_sign=grad_sign), **self.values(group))
        return [values[c] for c in self.columns]

    def group(self, **hyperparameters: Any) -> dict[str, Any]:
        """A param group's numbers (no params): the rule's defaults, updated, with the decay keys."""
        group = {**self.defaults, "decay": "decoupled", "maximize": False, **hyperparameters}
        if group.get("lr_max") is None:
            group.pop("lr_max", None)  # decay="independent" then divides by the group's lr
        return group

    # ------------------------------------------------------------- state
    def initialized_step(self, state: Mapping[str, Any]) -> Optional[float]:
        """The step count to resume from for a parameter's saved state (None: none saved)."""
        if self.step_in_state:
            step = state.get("step")
            return None if step is None else float(step)
        # torch keeps no step (SGD's buffer starts as a copy of the first gradient):
        # a saved state means that first step has happened
        saved = any(state.get(s.name) is not None or state.get(s.name + "_codes") is not None
                    for s in self.states)
        return 1.0 if saved else None

    @property
    def reduces(self) -> bool:
        """A two-phase rule: its update needs sums over each whole tensor (``sums``)."""
        return bool(self.sums)

    @property
    def unsigned_states(self) -> frozenset[str]:
        return frozenset(s.name for s in self.states if not s.signed)
