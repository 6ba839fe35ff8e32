"""`python -m lstm_fused demo [--quick] [--out DIR]`: what the fused LSTM and its gradient-flow
telemetry show, on a CPU in a few minutes (about one with --quick).

1. Drop-in timing: the same small LSTM regressor, trained with torch.nn.LSTM and with
   lstm_fused.LSTM from the same initial weights on the same batches; time per step and the
   final losses side by side.
2. The adding problem (Hochreiter & Schmidhuber 1997): a sequence of T uniform random numbers,
   two of them marked; the target is the sum of the marked two, read after the last step.
   Always predicting the mean scores an MSE of 1/6 ~ 0.167. Three models of the same size,
   an lstm_fused.LSTM with forget_bias 0, one with forget_bias 1 and an nn.RNN (tanh), train
   for a fixed number of steps at the shorter T (200; 50 with --quick), then go on at the
   longer T (1000; 100 with --quick) from where they are: learning T=1000 from scratch takes
   far more steps than a CPU demo has. Before and after each stage one fixed batch is
   backpropagated with gradient-flow recording (for nn.RNN, which has no telemetry, by
   unrolling its recurrence with retain_grad on every h[t]). Written to the output folder:
   gradient_flow_T{T}.png (heatmaps of ||dL/dh[t]|| and ||dL/dc[t]||, each row relative to
   its maximum) and losses.png (training curves).
3. The cell variants on the same problem: an lstm_fused.LSTM (forget_bias 1) plain, with
   layer_norm, with zoneout (0.5, 0.05), and with 2 layers without and with residual, trained
   the same way up to T=1000 (100 with --quick). Written: variants_gradient_flow_T{T}.png
   (the bottom layer's norms before and after each stage) and variants_losses.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import gradflow
from .module import LSTM

__all__ = ["main"]

MEAN_PREDICTOR_MSE = 1 / 6  # variance of the sum of two independent U(0, 1)


@dataclass(frozen=True)
class Budget:
    """How much the demo trains."""

    timing_length: int
    timing_steps: int
    adding_steps: dict[int, int]  # sequence length T -> training steps per model
    variant_steps: dict[int, int]  # the same for the cell variants' models (section 3)
    batch: int = 128
    hidden: int = 32
    learning_rate: float = 2e-2


# With this configuration an LSTM with forget_bias=1 leaves the mean-predictor plateau after
# 200-300 steps at T=50 and 550-850 at T=200 (a few seeds); forget_bias=0 takes longer (about
# 1100 steps at T=200 with the demo's seed); nn.RNN stays on it.
QUICK = Budget(timing_length=100, timing_steps=30, adding_steps={50: 500, 100: 150},
               variant_steps={50: 300, 100: 60})
FULL = Budget(timing_length=200, timing_steps=50, adding_steps={200: 1200, 1000: 100},
              variant_steps={200: 800, 1000: 100})


def adding_problem(length: int, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Inputs (length, batch, 2) = [value, marker] and targets (batch,): one marked value in
    each half of the sequence, target = their sum."""
    values = torch.rand(length, batch, generator=generator)
    markers = torch.zeros(length, batch)
    half = length // 2
    rows = torch.arange(batch)
    markers[torch.randint(0, half, (batch,), generator=generator), rows] = 1.0
    markers[torch.randint(half, length, (batch,), generator=generator), rows] = 1.0
    return torch.stack([values, markers], -1), (values * markers).sum(0)


class Regressor(nn.Module):
    """A recurrent layer (nn.LSTM, lstm_fused.LSTM or nn.RNN) read out after the last step."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][-1]).squeeze(-1)


def _progress(steps: int, label: str):
    """range(steps) under a tqdm bar, or with a plain line every fifth of the way."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain_progress(steps, label)
    return tqdm(range(steps), desc=label, leave=False, mininterval=0.5)


def _plain_progress(steps: int, label: str):
    every = max(1, steps // 5)
    for step in range(steps):
        if step % every == 0:
            print(f"  {label}: step {step}/{steps}", flush=True)
        yield step


def train(model: nn.Module, length: int, budget: Budget, steps: int, label: str,
          seed: int = 0) -> tuple[list[float], float]:
    """Adam on fresh adding-problem batches (the same ones for every model given the same
    seed), gradient norm clipped to 1. Returns (loss per step, median seconds per step: robust
    to the first steps' warm-up and to a busy machine)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=budget.learning_rate)
    losses, seconds = [], []
    for _ in _progress(steps, label):
        start = time.perf_counter()
        x, y = adding_problem(length, budget.batch, generator)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        seconds.append(time.perf_counter() - start)
    return losses, statistics.median(seconds)


def running_mean(losses: list[float], window: int = 20) -> list[float]:
    """Mean of the last `window` losses at every step: a single batch's loss is noisy."""
    values = torch.tensor(losses, dtype=torch.float64)
    sums = torch.cat([values.new_zeros(1), values.cumsum(0)])
    steps = torch.arange(1, len(losses) + 1)
    starts = (steps - window).clamp_min(0)
    return ((sums[steps] - sums[starts]) / (steps - starts)).tolist()


# -- 1. drop-in timing ------------------------------------------------------------------------

def compare_with_nn_lstm(budget: Budget) -> None:
    length, steps = budget.timing_length, budget.timing_steps
    print(f"\n[1] nn.LSTM vs lstm_fused.LSTM: adding problem T={length}, B={budget.batch}, "
          f"H={budget.hidden}, {steps} Adam steps each, same initial weights and batches")
    torch.manual_seed(0)
    reference = Regressor(nn.LSTM(2, budget.hidden))
    fused = Regressor(LSTM.from_torch(reference.rnn))
    fused.head.load_state_dict(reference.head.state_dict())
    results = {}
    for label, model in (("torch.nn.LSTM", reference), ("lstm_fused.LSTM", fused)):
        results[label] = train(model, length, budget, steps, label)
    print(f"  {'':<16}{'ms/step':>9}{'first loss':>12}{'final loss':>12}")
    for label, (losses, seconds) in results.items():
        print(f"  {label:<16}{seconds * 1e3:>9.1f}{losses[0]:>12.4f}{losses[-1]:>12.4f}")
    ratio = results["torch.nn.LSTM"][1] / results["lstm_fused.LSTM"][1]
    print(f"  lstm_fused.LSTM trains at {ratio:.2f}x the speed of nn.LSTM here (median step: "
          f"forward, backward, Adam; float32, CPU, {torch.get_num_threads()} threads)")


# -- 2. the adding problem and its gradient flow ----------------------------------------------

def rnn_hidden_gradient_norms(model: Regressor, x: Tensor, y: Tensor) -> Tensor:
    """||dL/dh[t]||_2 over the batch per step t (T,) for a one-layer nn.RNN (tanh) regressor,
    by unrolling h[t] = tanh(W_ih x[t] + b_ih + W_hh h[t-1] + b_hh) with its own parameters
    and retain_grad on every h[t] (nn.RNN has no telemetry)."""
    rnn = model.rnn
    h = x.new_zeros(x.shape[1], rnn.hidden_size)
    hidden_states = []
    for x_t in x:
        h = torch.tanh(x_t @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h @ rnn.weight_hh_l0.T
                       + rnn.bias_hh_l0)
        h.retain_grad()
        hidden_states.append(h)
    loss = nn.functional.mse_loss(model.head(h).squeeze(-1), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.stack([h.grad.norm() for h in hidden_states])


def lstm_gradient_flow(model: Regressor, x: Tensor, y: Tensor) -> gradflow.ModuleFlow:
    with gradflow.record_gradient_flow(model) as flow:
        loss = nn.functional.mse_loss(model(x), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
    return flow["rnn"]


def gradient_norms(model: Regressor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Per-step gradient norms (T,) of one batch: {"dh": ..., "dc": ...} (no "dc" for nn.RNN)."""
    if isinstance(model.rnn, LSTM):
        flow = lstm_gradient_flow(model, x, y)
        return {"dh": flow.dh_norm[0, 0], "dc": flow.dc_norm[0, 0]}
    return {"dh": rnn_hidden_gradient_norms(model, x, y)}


def make_models(budget: Budget) -> dict[str, Regressor]:
    torch.manual_seed(1)
    return {
        "LSTM forget_bias=0": Regressor(LSTM(2, budget.hidden, forget_bias=0.0)),
        "LSTM forget_bias=1": Regressor(LSTM(2, budget.hidden, forget_bias=1.0)),
        "nn.RNN tanh": Regressor(nn.RNN(2, budget.hidden, nonlinearity="tanh")),
    }


def make_variant_models(budget: Budget) -> dict[str, Regressor]:
    """Section 3: the cell variants, each an lstm_fused.LSTM with forget_bias 1 (the better
    plain LSTM of section 2), from the same seed."""
    torch.manual_seed(2)
    H = budget.hidden
    return {
        "LSTM": Regressor(LSTM(2, H, forget_bias=1.0)),
        "LSTM layer_norm": Regressor(LSTM(2, H, forget_bias=1.0, layer_norm=True)),
        "LSTM zoneout (0.5, 0.05)": Regressor(LSTM(2, H, forget_bias=1.0, zoneout=(0.5, 0.05))),
        "LSTM 2 layers": Regressor(LSTM(2, H, num_layers=2, forget_bias=1.0)),
        "LSTM 2 layers residual": Regressor(LSTM(2, H, num_layers=2, forget_bias=1.0,
                                                 residual=True)),
    }


def adding_experiment(models: dict[str, Regressor], length: int, budget: Budget,
                      out: Path, variants: bool = False) -> dict[str, list[float]]:
    """Train the models (in place) at this length, print their losses and gradient-flow
    verdicts, write the heatmap of before and after. Returns the loss curves by model.
    variants: section 3's models (their budget, file names and titles)."""
    steps = (budget.variant_steps if variants else budget.adding_steps)[length]
    section = "[3] cell variants," if variants else "[2]"
    print(f"\n{section} adding problem, T={length}: {steps} Adam steps per model, "
          f"B={budget.batch}, H={budget.hidden}, lr={budget.learning_rate} (predicting the "
          f"mean: MSE {MEAN_PREDICTOR_MSE:.3f})")
    x, y = adding_problem(length, budget.batch, torch.Generator().manual_seed(12345))
    losses = {}
    rows = {"dh": {}, "dc": {}}  # heatmap rows: norm kind -> row label -> (T,)
    verdicts = []
    for label, model in models.items():
        before = gradient_norms(model, x, y)
        losses[label], _ = train(model, length, budget, steps, f"T={length} {label}", seed=length)
        after = gradient_norms(model, x, y)
        for when, norms in (("before", before), ("after", after)):
            for kind, values in norms.items():
                rows[kind][f"{label}, {when}"] = values
        ratio = gradflow.decay_ratio(after["dh"], reverse=False)
        verdicts.append((label, running_mean(losses[label])[-1], ratio,
                         gradflow.verdict(after["dh"], ratio)))
    width = max(20, max(len(label) for label in models) + 2)
    print(f"  {'model':<{width}}{'final MSE':>10}{'||dL/dh[0]|| / ||dL/dh[T-1]||':>32}  verdict")
    for label, loss, ratio, verdict in verdicts:
        print(f"  {label:<{width}}{loss:>10.4f}{ratio:>32.3g}  {verdict}")
    layer = " (2 layers: the bottom one)" if variants else ""
    path = gradflow.plot_heatmaps(
        {f"||dL/dh[t]||{layer}": rows["dh"], "||dL/dc[t]|| (LSTM cell state)": rows["dc"]},
        out / f"{'variants_' if variants else ''}gradient_flow_T{length}.png", relative=True,
        title=f"Adding problem, T={length}: gradient norm back through time,\nbefore and after "
              f"{steps} training steps at this T (grey: underflow to 0)")
    print(f"  wrote {path}")
    return losses


def plot_losses(curves: dict[int, dict[str, list[float]]], path: Path,
                title: str = "adding problem") -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(curves), 3.6), layout="constrained")
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (length, by_model) in zip(axes, curves.items()):
        for label, losses in by_model.items():
            ax.plot(running_mean(losses), label=label, linewidth=1.2)
        ax.axhline(MEAN_PREDICTOR_MSE, color="grey", linestyle="--", linewidth=1,
                   label="predict the mean")
        ax.set_yscale("log")
        ax.set_title(f"{title}, T={length}")
        ax.set_xlabel("training step")
        ax.set_ylabel("MSE (mean of the last 20 steps)")
    axes[0].legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the demo with command-line arguments `argv`; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m lstm_fused demo",
        description="Train lstm_fused.LSTM next to nn.LSTM and nn.RNN and picture the "
                    "gradient flow back through time (needs matplotlib for the pictures).")
    parser.add_argument("--quick", action="store_true",
                        help="shorter sequences and fewer steps (about a minute)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"),
                        help="folder for the PNG files (default: demo_out/)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:  # up front, not after the training
        print("the demo draws its pictures with matplotlib: pip install matplotlib")
        return 2
    budget = QUICK if args.quick else FULL
    # Vanishing gradients run into subnormal floats, which x86 CPUs process ~100x slower:
    # flush them to zero (for every model alike; the norms lose nothing visible).
    torch.set_flush_denormal(True)
    start = time.perf_counter()
    try:
        compare_with_nn_lstm(budget)
        models = make_models(budget)
        curves = {length: adding_experiment(models, length, budget, args.out)
                  for length in budget.adding_steps}
        print(f"\nwrote {plot_losses(curves, args.out / 'losses.png')}")
        variant_models = make_variant_models(budget)
        variant_curves = {length: adding_experiment(variant_models, length, budget, args.out,
                                                    variants=True)
                          for length in budget.variant_steps}
        print(f"\nwrote "
              f"{plot_losses(variant_curves, args.out / 'variants_losses.png', 'cell variants')}")
    finally:
        torch.set_flush_denormal(False)  # torch's default
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0
