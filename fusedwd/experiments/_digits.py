"""The small real task of the heatmap and schedules experiments, and its trainer.

scikit-learn's 8x8 digits (1,797 images, 10 classes): 320 training images of
which a fifth carry a wrong label, the other 1,477 as a clean test set. A
small MLP, 64-64-LN-ReLU-64-ReLU-10 (LayerNorm without learned gain), fits
the noisy labels within a few dozen epochs unless something stops it, so how
it is regularized shows in the test error. The one normalization layer makes
the first layer's weights scale-invariant, where decay only sets an effective
learning rate (the equilibrium experiment), while the second and last layers'
decay bounds the function, as L2 regularization does; with LayerNorm after
every hidden layer only the last layer would be left for that (a pilot with
LayerNorm after both, and with learned gains, gave the same two regimes in
the heatmap but a best decay that drifted with the lr under every mode).

Grids of hyperparameters are trained as a *population*: one independent copy
of the MLP per cell, all stepped by one fusedwd optimizer in which each cell
has its own param groups (weights with the cell's lr and decay; biases with
its lr and no decay, as :func:`fusedwd.param_groups` would split them). One
batched forward pass serves every cell, which is what makes an 11 x 11 grid
over several seeds fit in minutes on two cores. Within a seed every cell
starts from the same initialization and sees the same minibatches, so
differences across the grid are the hyperparameters', not the noise's.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

import fusedwd
from fusedwd.schedules import WarmRestarts, normalized_weight_decay

N_TRAIN = 320  # training images; the other 1,477 are the test set
BATCH = 32  # 10 steps an epoch
LABEL_NOISE = 0.2  # fraction of training labels replaced by a different class
HIDDEN = 64
CLASSES = 10
ADAM_BETAS = (0.9, 0.999)
SGD_MOMENTUM = 0.9

# per MLP: (name, shape, decayed); weights decayed, biases not
_LAYOUT = (
    ("w1", (HIDDEN, 64), True), ("b1", (HIDDEN,), False),
    ("w2", (HIDDEN, HIDDEN), True), ("b2", (HIDDEN,), False),
    ("w3", (CLASSES, HIDDEN), True), ("b3", (CLASSES,), False),
)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside, restored after.

    A population's ops are small (121 cells x 32 images x 64 units). On the
    2-core machine, 121 cells: 7.6 ms a step on one thread, 5.4 ms on two when
    the machine is otherwise idle; with other jobs running, 25 ms on one and
    120-250 ms on two, whose OpenMP threads then wait for each other. One
    thread keeps the full runs within their time on a shared machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor  # (N_TRAIN, 64), standardized with the training statistics
    y_train: torch.Tensor  # noisy labels
    x_test: torch.Tensor
    y_test: torch.Tensor  # clean labels
    flipped: float  # fraction of training labels that are wrong


def load(seed: int, n_train: int = N_TRAIN, label_noise: float = LABEL_NOISE) -> Digits:
    """A random train/test split of the digits, ``label_noise`` of the training labels flipped."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(
            "the heatmap and schedules experiments train on scikit-learn's digits data set: "
            'install it with the experiments extra: pip install "fusedwd[experiments]" (`make test` installs it)'
        ) from e
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(10_000 + seed)
    order = torch.randperm(len(y), generator=gen)
    train, test = order[:n_train], order[n_train:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / (std + 1.0)  # + 1: some border pixels are (almost) always 0
    y_train = y[train].clone()
    noisy = torch.rand(n_train, generator=gen) < label_noise
    # a different class: shift by 1..9
    y_train[noisy] = (y_train[noisy] + torch.randint(1, CLASSES, (int(noisy.sum()),), generator=gen)) % CLASSES
    return Digits(x[train], y_train, x[test], y[test], float(noisy.float().mean()))


class Population:
    """``cells`` independent MLPs from one initialization, run in one batched pass.

    Each layer's parameters of all cells live in one stacked tensor, which the
    forward pass uses whole; each cell's parameters are leaf views into it (what
    the optimizer steps, in place) whose gradients are views into the stacked
    gradient. Stacking the cells' tensors every step instead made the step
    1.4x slower (121 cells, one thread: 11.6 ms against 7.6 ms).
    """

    def __init__(self, cells: int, gen: torch.Generator) -> None:
        self.stacked = {}
        for name, shape, _ in _LAYOUT:
            if name.startswith("w"):  # torch.nn.Linear's default init
                bound = 1 / math.sqrt(shape[1])
                one = (torch.rand(shape, generator=gen) * 2 - 1) * bound
            elif name.startswith("g"):
                one = torch.ones(shape)
            else:
                one = torch.zeros(shape)
            self.stacked[name] = one.expand(cells, *shape).clone().requires_grad_()
        # nn.Parameter of a view: a leaf sharing the stacked storage
        self.cells = [{name: torch.nn.Parameter(s.detach()[c]) for name, s in self.stacked.items()}
                      for c in range(cells)]
        self._grads = None

    def param_groups(self, lrs: Sequence[float], wds: Sequence[float]) -> list[dict]:
        """Two groups per cell, in cell order: its weights (lr, wd), then its biases (lr, no decay)."""
        groups = []
        for cell, lr, wd in zip(self.cells, lrs, wds, strict=True):
            groups.append({"params": [cell[n] for n, _, d in _LAYOUT if d], "lr": lr, "weight_decay": wd})
            groups.append({"params": [cell[n] for n, _, d in _LAYOUT if not d], "lr": lr, "weight_decay": 0.0})
        return groups

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (cells, batch, CLASSES)."""
        p = self.stacked
        h = x.expand(len(self.cells), *x.shape)
        # no gain after the norm: an undecayed gain could undo the decay of the layers after it
        h = torch.relu(F.layer_norm(torch.baddbmm(p["b1"][:, None], h, p["w1"].transpose(1, 2)), (HIDDEN,)))
        h = torch.relu(torch.baddbmm(p["b2"][:, None], h, p["w2"].transpose(1, 2)))
        return torch.baddbmm(p["b3"][:, None], h, p["w3"].transpose(1, 2))

    def backward(self, loss: torch.Tensor) -> None:
        """Zero the gradients, backpropagate ``loss``, hand each cell its gradient views."""
        for s in self.stacked.values():
            if s.grad is not None:
                s.grad.zero_()
        loss.backward()
        grads = [s.grad for s in self.stacked.values()]
        # autograd accumulates into an existing .grad in place; re-point the views if it did not
        if self._grads is None or any(a is not b for a, b in zip(grads, self._grads)):
            for c, cell in enumerate(self.cells):
                for name, g in zip(self.stacked, grads):
                    cell[name].grad = g[c]
            self._grads = grads


def train(
    optimizer: str,
    decay: str,
    lrs: Sequence[float],
    wds: Sequence[float],
    *,
    seed: int,
    epochs: int,
    period: Optional[float] = None,
    t_mult: float = 1.0,
    normalized: bool = False,
    eval_epochs: Optional[Sequence[int]] = None,
    data: Optional[Digits] = None,
) -> dict:
    """Train one population, a cell per ``(lrs[i], wds[i])``; test and train errors at ``eval_epochs``.

    Args:
        optimizer: ``"adamw"`` (fusedwd.AdamW, betas ADAM_BETAS) or ``"sgdw"``
            (fusedwd.SGDW, momentum SGD_MOMENTUM).
        decay: the fusedwd weight-decay mode.
        lrs, wds: per cell; ``wds`` are lambda_norm when ``normalized``.
        period: None for a constant lr; else cosine annealing with warm restarts
            (:class:`fusedwd.schedules.WarmRestarts`) with first period ``period``
            epochs, growing by ``t_mult``; ``period=epochs`` is one cosine to the budget.
        normalized: each cell's decay is ``normalized_weight_decay(wds[i], BATCH, N_TRAIN, T)``
            with T the current period (the whole run under a constant lr), recomputed at
            every restart as the paper's AdamWR does (WarmRestarts' own ``lambda_norm`` sets
            one value for all groups; here each cell has its own).
        eval_epochs: epochs after which to measure (default: the last).

    Returns:
        ``{"test_error": [[cell x eval]], "train_error": [[cell x eval]]}``, errors in [0, 1];
        train error against the noisy labels the model is trained on.
    """
    data = data if data is not None else load(seed)
    eval_epochs = sorted(eval_epochs or [epochs])
    gen = torch.Generator().manual_seed(seed)
    model = Population(len(lrs), gen)
    n_train = len(data.y_train)
    steps_per_epoch = n_train // BATCH

    def raw_wds(t_period: float) -> list[float]:
        if not normalized:
            return list(wds)
        return [normalized_weight_decay(w, BATCH, n_train, t_period) for w in wds]

    groups = model.param_groups(lrs, raw_wds(period if period is not None else epochs))
    if optimizer == "adamw":
        opt = fusedwd.AdamW(groups, betas=ADAM_BETAS, decay=decay)
    elif optimizer == "sgdw":
        opt = fusedwd.SGDW(groups, momentum=SGD_MOMENTUM, decay=decay)
    else:
        raise ValueError(f"Unknown optimizer {optimizer!r} (expected 'adamw' or 'sgdw')")
    sched = WarmRestarts(opt, T_0=period, T_mult=t_mult, steps_per_epoch=steps_per_epoch) if period else None
    cells = len(lrs)
    y_rep = data.y_train.repeat(cells, 1)
    test_error, train_error = [[] for _ in range(cells)], [[] for _ in range(cells)]
    period_index = 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n_train, generator=gen)
        for k in range(steps_per_epoch):
            idx = order[k * BATCH:(k + 1) * BATCH]
            logits = model(data.x_train[idx])
            # the sum over cells of each cell's mean loss: every cell gets its own gradient
            loss = F.cross_entropy(logits.flatten(0, 1), y_rep[:, idx].flatten(), reduction="sum") / len(idx)
            model.backward(loss)
            opt.step()
            if sched is not None:
                sched.step()
                i, _, t_i = sched.period(sched.last_epoch / steps_per_epoch)
                if normalized and i != period_index:  # a restart: the new period's decay
                    period_index = i
                    for g, wd in zip(opt.param_groups[::2], raw_wds(t_i)):  # each cell's decayed group
                        g["weight_decay"] = wd
        if epoch in eval_epochs:
            with torch.no_grad():
                for errors, x, y in ((test_error, data.x_test, data.y_test), (train_error, data.x_train, data.y_train)):
                    wrong = (model(x).argmax(-1) != y).float().mean(1)
                    for c in range(cells):
                        errors[c].append(wrong[c].item())
    return {"test_error": test_error, "train_error": train_error}
