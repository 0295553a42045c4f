"""Training and inference throughput of our ViT against torchvision's and vit-pytorch's, and model FLOP utilisation.

Run from the repository root (vit-pytorch is a benchmark-only dependency, see benchmarks/requirements.txt):

    python benchmarks/throughput.py              # MNIST config + a few ViT-B/16 steps: a few minutes on 2 cores
    python benchmarks/throughput.py --quick      # MNIST config only, few steps: a smoke test (under a minute)
    python benchmarks/throughput.py --compile ours,vit-pytorch   # also torch.compile'd copies (minutes of compiling)

What is measured, in one process, on the same inputs:

1. The machine's matrix-multiply rate: ``torch.mm`` of two n x n float32 matrices (2 n^3 FLOPs), n = 2048.
2. For each configuration (``hf.VIT_CONFIGS["vit_mnist"]``, read at run time, at ``hf.MNIST_RECIPE``'s batch size;
   ``vit_b_16`` at 224 px with a small batch), three models built from the same numbers:
   - ``ours``: ``helper_functions.ViT``;
   - ``torchvision``: ``torchvision.models.VisionTransformer``;
   - ``vit-pytorch``: lucidrains' ``vit_pytorch.ViT``, if installed.
3. Training images/second: one step = forward, cross-entropy loss, ``zero_grad``, backward, ``AdamW.step`` (the same
   code for every model), on a fixed batch of random images already in memory (so data loading is not timed).
   Inference images/second: forward only, in ``eval`` mode under ``torch.inference_mode``.
4. Repeats are interleaved (matmul, A, B, C, matmul, A, B, C, ...), so a slow spell on a shared machine hits every
   model alike; we report medians and the ratios of medians.
5. With ``--compile``, a ``torch.compile``'d copy of each named model is timed beside the eager one (``ours+compile``).
6. With ``--profile N``, ``torch.profiler`` records N more training steps of each model and the report gives, per
   model, the milliseconds per step spent in each operator (self CPU time, so nothing is counted twice) and outside
   every operator (Python, modules, the dispatcher): where one model's time goes that another's does not.
7. Model FLOP utilisation (MFU) = training FLOPs per image x training images/s / matmul rate, with the FLOPs per
   image counted from the configuration by ``vit_flops`` (the work the configuration needs, the same number for every
   model, whatever extra work a model does).

How each model is made to do the same work:
- Channels: torchvision's ViT is RGB-only (its ``conv_proj`` has 3 input channels). For 1-channel MNIST we replace
  its ``conv_proj`` with a ``Conv2d(1, D, P, stride=P)``, so every model reads the same (batch, 1, 28, 28) images.
- vit-pytorch is configured with dim = D, depth = L, heads = k, dim_head = D / k, mlp_dim = MLP size, channels, pool,
  dropout, emb_dropout. It is not the same model: it puts LayerNorms before and after its patch projection (two more
  than ours), its qkv projection has no bias, its patches are cut by a reshape + Linear instead of a Conv2d, and its
  ``dropout`` is also applied to the attention probabilities (ours and torchvision's have a separate
  ``attn_dropout``, 0 in every config here), so at ViT-B/16 (dropout 0.1) it does a little more work. It cannot load
  the paper's or torchvision's weights.
- torchvision uses one ``dropout`` for the embeddings, the MLP and the attention output; ours has a separate
  ``embedding_dropout`` (a warning says so if a config sets it apart from ``dropout``). Only ``pool="cls"`` exists in
  torchvision.
"""
from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

REPO_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR))  # helper_functions.py lives at the repository's top level
import helper_functions as hf  # noqa: E402
import machinery  # noqa: E402

MODELS = ("ours", "torchvision", "vit-pytorch")
VIT_PYTORCH_FIX = "pip install -r benchmarks/requirements.txt"


# 1. FLOPs, counted from the configuration ----------------------------------------------------------------------------


def vit_flops(image_size: int = 224, in_channels: int = 3, patch_size: int = 16, num_layers: int = 12,
              num_heads: int = 12, embedding_dim: int = 768, mlp_size: int = 3072, num_classes: int = 1000,
              pool: str = "cls", **_: Any) -> dict[str, int]:
    """FLOPs per image of one forward pass of a ViT, counted from its configuration (extra keys are ignored).

    Only matrix multiplies are counted, a multiply-add being 2 FLOPs: an (m x k) @ (k x n) product costs 2 m k n.
    With N = (image_size / P)^2 patches, T = N + 1 tokens (N with ``pool="mean"``), D = embedding_dim, M = mlp_size:

    - patch embedding (Eq. 1): each of N patches of P^2 C pixels times a (P^2 C x D) matrix: 2 N P^2 C D;
    - per encoder layer (Eqs. 2-3):
      q, k, v projections 2 T D (3D); attention scores q k^T, all k heads together (k T^2 D_h = T^2 D): 2 T^2 D;
      scores times v: 2 T^2 D; output projection W^O: 2 T D^2; MLP, two dense layers: 2 (2 T D M);
    - head: 2 D num_classes.

    LayerNorm, softmax, GELU, biases, residual additions and the optimizer are not counted (at most a few per cent
    of the total here). A training step costs about 3x the forward pass (``train`` key): the backward pass multiplies
    each layer's output gradient by its weights (input gradient) and by its inputs (weight gradient), two products
    the size of the forward one. This is the usual convention for model FLOP utilisation (PaLM, Chowdhery et al.
    2022, Appendix B); it slightly overcounts the patch embedding, whose input (the image) needs no gradient.
    """
    if pool not in {"cls", "mean"}:
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
    n_patches = (image_size // patch_size) ** 2
    t, d, m = n_patches + (pool == "cls"), embedding_dim, mlp_size
    per_layer = {"qkv": 2 * t * d * 3 * d, "scores": 2 * t * t * d, "weighted_values": 2 * t * t * d,
                 "out_proj": 2 * t * d * d, "mlp": 2 * 2 * t * d * m}
    flops = {"patch_embedding": 2 * n_patches * patch_size ** 2 * in_channels * d,
             **{name: num_layers * value for name, value in per_layer.items()},
             "head": 2 * d * num_classes}
    flops["forward"] = sum(flops.values())
    flops["train"] = 3 * flops["forward"]
    return flops


# 2. The three models, built from one configuration -------------------------------------------------------------------


def full_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``hf.ViT``'s defaults filled in for every argument it leaves out."""
    defaults = {name: p.default for name, p in inspect.signature(hf.ViT).parameters.items()}
    return {**defaults, **config}


def build_ours(config: dict[str, Any]) -> nn.Module:
    """``helper_functions.ViT`` with ``config``."""
    return hf.ViT(**config)


def build_torchvision(config: dict[str, Any]) -> nn.Module:
    """``torchvision.models.VisionTransformer`` with the same numbers (``conv_proj`` swapped if not 3 channels)."""
    c = full_config(config)
    if c["pool"] != "cls":
        raise ValueError("torchvision's VisionTransformer only classifies from the class token (pool='cls')")
    if c["embedding_dropout"] != c["dropout"]:
        warnings.warn(f"torchvision has one dropout rate: using dropout={c['dropout']} for its embeddings too "
                      f"(ours uses embedding_dropout={c['embedding_dropout']})", stacklevel=2)
    model = torchvision.models.VisionTransformer(
        image_size=c["image_size"], patch_size=c["patch_size"], num_layers=c["num_layers"], num_heads=c["num_heads"],
        hidden_dim=c["embedding_dim"], mlp_dim=c["mlp_size"], dropout=c["dropout"],
        attention_dropout=c["attn_dropout"], num_classes=c["num_classes"])
    if c["in_channels"] != 3:  # torchvision's patch projection is RGB-only: give it the images' channel count
        model.conv_proj = nn.Conv2d(c["in_channels"], c["embedding_dim"], kernel_size=c["patch_size"],
                                    stride=c["patch_size"])
    return model


def vit_pytorch_available() -> bool:
    """Whether lucidrains' vit-pytorch can be imported."""
    try:
        import vit_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def build_vit_pytorch(config: dict[str, Any]) -> nn.Module:
    """lucidrains' ``vit_pytorch.ViT`` configured as closely as it allows (differences: see the module docstring)."""
    try:
        from vit_pytorch import ViT as LucidrainsViT
    except ImportError as error:
        raise ImportError(f"vit-pytorch is not installed; {VIT_PYTORCH_FIX}") from error
    c = full_config(config)
    return LucidrainsViT(image_size=c["image_size"], patch_size=c["patch_size"], num_classes=c["num_classes"],
                         dim=c["embedding_dim"], depth=c["num_layers"], heads=c["num_heads"],
                         dim_head=c["embedding_dim"] // c["num_heads"], mlp_dim=c["mlp_size"], pool=c["pool"],
                         channels=c["in_channels"], dropout=c["dropout"], emb_dropout=c["embedding_dropout"])


BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "ours": build_ours, "torchvision": build_torchvision, "vit-pytorch": build_vit_pytorch}


# 3. Timing -----------------------------------------------------------------------------------------------------------


class Runner:
    """One model, its AdamW optimizer, loss and a fixed batch: ``train(steps)`` and ``infer(steps)`` return the
    (wall seconds, process CPU seconds) that many steps took."""

    def __init__(self, model: nn.Module, config: dict[str, Any], batch_size: int, seed: int = 0,
                 compile: bool = False) -> None:
        c = full_config(config)
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch_size, c["in_channels"], c["image_size"], c["image_size"],
                                  generator=generator)  # (batch, channels, height, width)
        self.labels = torch.randint(0, c["num_classes"], (batch_size,), generator=generator)
        self.model = model
        self.forward = torch.compile(model) if compile else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.loss_fn = nn.CrossEntropyLoss()

    def train_step(self) -> None:
        loss = self.loss_fn(self.forward(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def infer_step(self) -> None:
        with torch.inference_mode():
            self.forward(self.images)

    def _time(self, step: Callable[[], None], steps: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        return time.perf_counter() - wall, time.process_time() - cpu

    def train(self, steps: int) -> tuple[float, float]:
        self.model.train()
        return self._time(self.train_step, steps)

    def infer(self, steps: int) -> tuple[float, float]:
        self.model.eval()
        return self._time(self.infer_step, steps)


def matmul_seconds(a: torch.Tensor, b: torch.Tensor, times: int = 3) -> float:
    """Median wall seconds of ``torch.mm(a, b)`` over ``times`` calls."""
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        torch.mm(a, b)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def profile_training(runner: Runner, steps: int) -> dict[str, float]:
    """Milliseconds per training step in each operator (its self CPU time, ``torch.profiler``), and in
    ``"(outside operators)"``: the wall time of the steps that no operator accounts for."""
    runner.model.train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            runner.train_step()
        wall = time.perf_counter() - start
    per_step = {event.key: event.self_cpu_time_total / 1e3 / steps for event in profiler.key_averages()}
    per_step["(outside operators)"] = wall * 1e3 / steps - sum(per_step.values())
    return dict(sorted(per_step.items(), key=lambda item: -item[1]))


def benchmark_config(name: str, config: dict[str, Any], batch_size: int, steps: int, repeats: int,
                     models: list[str], matmul_size: int = 2048, warmup: int = 2, compiled: tuple[str, ...] = (),
                     profile_steps: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Interleaved training and inference measurements of ``models`` at one configuration, plus a ``<model>+compile``
    row for each model in ``compiled``. The matmul rate (``matmul_size`` squared matrices) is measured once per
    repeat too, so this configuration's MFU is computed against the rate measured alongside it. With
    ``profile_steps``, each model's training step is then profiled (``profile_training``)."""
    flops = vit_flops(**full_config(config))
    runners = {}
    for model_name, compile in [(m, False) for m in models] + [(m, True) for m in models if m in compiled]:
        hf.set_seeds(0)
        start = time.perf_counter()
        label = model_name + "+compile" * compile
        runners[label] = Runner(BUILDERS[model_name](config), config, batch_size, compile=compile)
        runners[label].train(warmup)  # for a compiled model, this compiles
        runners[label].infer(warmup)
        log(f"  {name}: built and warmed up {label} in {time.perf_counter() - start:.1f} s")
    a, b = (torch.randn(matmul_size, matmul_size) for _ in range(2))
    matmul_rates = []
    records: dict[str, dict[str, list[float]]] = {m: {"train": [], "infer": [], "train_cpu": [], "infer_cpu": []}
                                                  for m in runners}
    for repeat in range(repeats):
        matmul_rates.append(2 * matmul_size ** 3 / matmul_seconds(a, b))
        for model_name, runner in runners.items():  # A B C, A B C, ...
            for kind in ("train", "infer"):
                wall, cpu = getattr(runner, kind)(steps)
                records[model_name][kind].append(steps * batch_size / wall)
                # images per second of process CPU time (all threads): steadier than wall time on a busy machine
                records[model_name][f"{kind}_cpu"].append(steps * batch_size / cpu if cpu > 0 else None)
        log(f"  {name}: repeat {repeat + 1}/{repeats} done")
    results = {"config": config, "batch_size": batch_size, "steps": steps, "repeats": repeats,
               "flops_per_image": flops, "matmul_flops_per_s": matmul_rates,
               "matmul_median_flops_per_s": statistics.median(matmul_rates), "models": {}}
    for model_name, rec in records.items():
        results["models"][model_name] = {
            "parameters": hf.count_parameters(runners[model_name].model),
            "train_images_per_s": rec["train"], "infer_images_per_s": rec["infer"],
            "train_images_per_cpu_s": rec["train_cpu"], "infer_images_per_cpu_s": rec["infer_cpu"],
            "train_median": statistics.median(rec["train"]), "infer_median": statistics.median(rec["infer"]),
            "train_cpu_median": statistics.median(rec["train_cpu"]),
            "infer_cpu_median": statistics.median(rec["infer_cpu"])}
    if profile_steps:
        results["profile_ms_per_train_step"] = {m: profile_training(r, profile_steps) for m, r in runners.items()}
    return results


def add_ratios_and_mfu(results: dict[str, Any]) -> None:
    """Add each model's MFU (against the matmul rate measured with this configuration), and the ratios of the
    medians of each of our rows (``ours``, ``ours+compile``) to every other model's:
    ``results["ratios"]["ours/torchvision"] = {"train": ..., "infer": ...}`` from wall-clock images/s, and the same
    from images per CPU-second in ``results["cpu_ratios"]`` (steadier when other programs share the CPU)."""
    flops, matmul_flops_per_s = results["flops_per_image"], results["matmul_median_flops_per_s"]
    for model in results["models"].values():
        model["mfu_train"] = flops["train"] * model["train_median"] / matmul_flops_per_s
        model["mfu_infer"] = flops["forward"] * model["infer_median"] / matmul_flops_per_s
    models = results["models"]
    results["ratios"], results["cpu_ratios"] = {}, {}
    for mine in (m for m in models if m.startswith("ours")):
        for other in (m for m in models if not m.startswith("ours")):
            for key, suffix in (("ratios", "median"), ("cpu_ratios", "cpu_median")):
                results[key][f"{mine}/{other}"] = {
                    kind: models[mine][f"{kind}_{suffix}"] / models[other][f"{kind}_{suffix}"]
                    for kind in ("train", "infer")}


# 4. Report: table, JSON, bar chart -----------------------------------------------------------------------------------


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of medians, ratios to ours and MFU, one block per configuration."""
    n = report["matmul"]["n"]
    lines = [f"torch {report['machine']['torch']}, {report['machine']['threads']} thread(s); MFU is against the "
             f"median rate of torch.mm on {n}x{n} float32 matrices, measured between the repeats"]
    for name, res in report["configs"].items():
        train_flops = res["flops_per_image"]["train"]
        lines += ["", f"{name}: batch {res['batch_size']}, medians of {res['repeats']} repeats of {res['steps']} "
                      f"step(s); {train_flops / 1e9:.4g} GFLOP per training image; matmul "
                      f"{res['matmul_median_flops_per_s'] / 1e9:.1f} GFLOP/s",
                  f"{'model':<20} {'train img/s':>12} {'infer img/s':>12} {'train MFU':>10} {'infer MFU':>10}"]
        for model_name, model in res["models"].items():
            lines.append(f"{model_name:<20} {model['train_median']:>12.4g} {model['infer_median']:>12.4g} "
                         f"{model['mfu_train']:>10.1%} {model['mfu_infer']:>10.1%}")
        for pair, ratio in res["ratios"].items():
            cpu = res["cpu_ratios"][pair]
            lines.append(f"  {pair:<30} training {ratio['train']:.2f}x   inference {ratio['infer']:.2f}x   "
                         f"(per CPU-second: {cpu['train']:.2f}x, {cpu['infer']:.2f}x)")
    for skipped, why in report.get("skipped", {}).items():
        lines.append(f"(skipped {skipped}: {why})")
    return "\n".join(lines)


def format_profile(results: dict[str, Any], rows: int = 12) -> str:
    """The operators whose milliseconds per training step differ most between the first model and another."""
    profile = results["profile_ms_per_train_step"]
    first, *others = profile.values()
    keys = sorted(set().union(*profile.values()),
                  key=lambda k: -max([abs(first.get(k, 0) - other.get(k, 0)) for other in others] or [first[k]]))
    lines = [f"{'ms per training step':<52}" + "".join(f"{m:>14}" for m in profile)]
    for key in ["(total)"] + keys[:rows]:
        values = [sum(p.values()) if key == "(total)" else p.get(key, 0.0) for p in profile.values()]
        lines.append(f"{key[:52]:<52}" + "".join(f"{v:>14.2f}" for v in values))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Bar chart of median training and inference images/s, one panel per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = report["configs"]
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes[0], configs.items()):
        models = list(res["models"])
        width = 0.8 / len(models)
        for i, model_name in enumerate(models):
            values = [res["models"][model_name][f"{kind}_median"] for kind in ("train", "infer")]
            bars = ax.bar([k + (i - (len(models) - 1) / 2) * width for k in range(2)], values, width,
                          label=model_name)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(2), ["training", "inference"])
        ax.set_ylabel("images / second (median)")
        ax.set_title(f"{name}, batch {res['batch_size']}")
        ax.legend(fontsize=8)
    fig.suptitle(f"ViT throughput, {report['machine']['threads']} thread(s), torch {report['machine']['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MNIST config only, 2 repeats of 3 steps")
    parser.add_argument("--configs", default=None, help="comma-separated names from hf.VIT_CONFIGS "
                        "(default: vit_mnist,vit_b_16; with --quick: vit_mnist)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7; --quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per measurement, MNIST (default 10; --quick 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="MNIST batch (default hf.MNIST_RECIPE's)")
    parser.add_argument("--large-batch-size", type=int, default=8, help="batch for 224-pixel configs (default 8)")
    parser.add_argument("--large-steps", type=int, default=1, help="steps per measurement, 224-pixel configs "
                        "(default 1)")
    parser.add_argument("--large-repeats", type=int, default=3, help="repeats for 224-pixel configs (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--compile", nargs="?", const="all", default="",
                        help="also time torch.compile'd copies of these models (comma-separated, or no value for all; "
                             "each adds about a minute of compiling per configuration)")
    parser.add_argument("--profile", type=machinery.positive_int, default=0, metavar="STEPS",
                        help="also profile STEPS training steps of each model: milliseconds per step by operator")
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n matmul (default 2048)")
    parser.add_argument("--out", type=Path, default=REPO_DIR / "benchmarks" / "results",
                        help="folder for throughput.json and throughput.png (default benchmarks/results/)")
    args = parser.parse_args(argv)
    args.configs = (args.configs or ("vit_mnist" if args.quick else "vit_mnist,vit_b_16")).split(",")
    args.models = args.models.split(",")
    args.compile = tuple(args.models if args.compile == "all" else filter(None, args.compile.split(",")))
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.steps = args.steps or (3 if args.quick else 10)
    for name in args.configs:
        if name not in hf.VIT_CONFIGS:
            parser.error(f"unknown configuration {name!r}; choose from {sorted(hf.VIT_CONFIGS)}")
    for name in (*args.models, *args.compile):
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table, write ``throughput.json`` and ``throughput.png`` to ``--out``; return the
    report."""
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads_before)  # leave the calling process (e.g. pytest) as it was


def _run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    models, skipped = list(args.models), {}
    if "vit-pytorch" in models and not vit_pytorch_available():
        models.remove("vit-pytorch")
        skipped["vit-pytorch"] = f"not installed; {VIT_PYTORCH_FIX}"
        print(f"vit-pytorch is not installed, so it is left out ({VIT_PYTORCH_FIX})")
    report: dict[str, Any] = {
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
                    "cpu": machinery.cpu_description()},
        "matmul": {"n": args.matmul_size}, "configs": {}, "skipped": skipped}
    started = time.perf_counter()
    for name in args.configs:
        config = dict(hf.VIT_CONFIGS[name])
        large = full_config(config)["image_size"] > 64
        batch = args.large_batch_size if large else (args.batch_size or hf.MNIST_RECIPE["batch_size"])
        print(f"{name}: {config}")
        report["configs"][name] = benchmark_config(
            name, config, batch, args.large_steps if large else args.steps,
            args.large_repeats if large else args.repeats, models, args.matmul_size, warmup=1 if large else 2,
            compiled=args.compile, profile_steps=args.profile)
    for res in report["configs"].values():
        add_ratios_and_mfu(res)
    report["seconds"] = time.perf_counter() - started
    print()
    print(format_table(report))
    for name, res in report["configs"].items():
        if "profile_ms_per_train_step" in res:
            print(f"\n{name}: where each model's training step goes (operators that differ most first)")
            print(format_profile(res))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "throughput.png")
    print(f"\nwrote {args.out / 'throughput.json'} and {args.out / 'throughput.png'} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
