"""Figures the notebooks show whose drawing code teaches nothing about the ViT: the architecture in the style of the
paper's Figure 1 (notebook 05, through ``hf.plot_vit_architecture``) and notebook 06's runs of bugs and fixes.
Learners call them as ``hf.<name>``; like machinery.py, this module never imports helper_functions.
"""
from __future__ import annotations

import math
from typing import Any


def draw_vit_architecture(c: dict[str, Any], shape: dict[str, str], name: str = ""):
    """The Vision Transformer drawn as the paper's Figure 1 draws it, with Eqs. 1-4 and the tensor shape after every
    stage: ``c`` holds every ``ViT`` argument, ``shape`` the shapes ``hf.vit_shapes`` gives, ``name`` goes in the
    title. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

    H, C, P, D, M = c["image_size"], c["in_channels"], c["patch_size"], c["embedding_dim"], c["mlp_size"]
    L, k, K, side = c["num_layers"], c["num_heads"], c["num_classes"], c["image_size"] // c["patch_size"]
    N, cls = side * side, c["pool"] == "cls"
    colours = dict(patch="#cfe2f3", cls="#f9cb9c", pos="#d9d2e9", encoder="#eeeeee", norm="#fff2cc", msa="#d9ead3",
                   mlp="#c9daf8", head="#f4cccc", add="#ffffff")

    fig, ax = plt.subplots(figsize=(14, 8.4))
    ax.set_xlim(0, 28)
    ax.set_ylim(0, 16.8)
    ax.set_aspect("equal")
    ax.axis("off")

    def box(x, y, w, h, text, colour, size=10.5, **kw):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.15", fc=colour,
                                    ec="#444444", lw=1.1, **kw))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)

    def arrow(x0, y0, x1, y1, label=None, at=0.5):
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, color="#444444",
                                     lw=1.1, shrinkA=0, shrinkB=0))
        if label:
            ax.text(max(x0, x1) + 0.25, y0 + at * (y1 - y0), label, ha="left", va="center", fontsize=9.5,
                    family="monospace", color="#1a4f8a")

    def tag(x, y, text):
        ax.text(x, y, text, ha="left", va="center", fontsize=9.5, color="#990000", style="italic")

    def residual(y_from, y_plus, y_tag, equation):  # the encoder block's (+) and the skip connection into it
        ax.add_patch(plt.Circle((bcx, y_plus), 0.3, fc="white", ec="#444444", lw=1.1))
        ax.text(bcx, y_plus, "+", ha="center", va="center", fontsize=13)
        ax.plot([bcx, bx + bw + 0.8, bx + bw + 0.8], [y_from, y_from, y_plus], color="#444444", lw=1.1)
        arrow(bx + bw + 0.8, y_plus, bcx + 0.3, y_plus)
        tag(bx + bw + 1.05, y_tag, equation)

    # Left: the whole model, bottom to top (as in the paper's Figure 1) -----------------------------------------------
    x0, w = 0.6, 7.8  # the column of boxes
    cx = x0 + w / 2
    ax.text(cx, 16.35, f"Vision Transformer{name}", ha="center", va="center", fontsize=13, weight="bold")
    # the image as a grid of P x P patches (at most 8 x 8 drawn)
    drawn = min(side, 8)
    cell = 1.6 / drawn
    for i in range(drawn):
        for j in range(drawn):
            ax.add_patch(Rectangle((x0 + 0.2 + j * cell, 0.3 + i * cell), cell, cell, fc=colours["patch"],
                                   ec="#444444", lw=0.8))
    ax.text(x0 + 2.15, 1.1, f"image, {H}x{H} pixels, {C} channel{'s' if C > 1 else ''}\ncut into N = {N} patches of "
            f"{P}x{P}", ha="left", va="center", fontsize=10.5)
    arrow(cx, 2.0, cx, 2.7, shape["patches"] + r"  flattened patches $\mathbf{x}_p$")
    box(x0, 2.7, w, 1.0, f"linear projection E: {P * P * C} -> {D} values per patch", colours["patch"])
    tag(x0 + w + 0.15, 3.2, "Eq. 1")
    arrow(cx, 3.7, cx, 4.4, shape["embedded"] + r"  $\mathbf{x}_p\mathbf{E}$")
    # the tokens: class token, then the patches, each with its position embedding
    ax.add_patch(FancyBboxPatch((x0, 4.4), w, 2.2, boxstyle="round,pad=0.02,rounding_size=0.15", fc="white",
                                ec="#444444", lw=1.1))
    shown = min(N, 16) + cls
    step = (w - 0.6) / shown
    for t in range(shown):
        is_cls = cls and t == 0
        label = "cls" if is_cls else ("..." if t == shown - 1 and N > 16 else str(t + (not cls)))
        ax.add_patch(Rectangle((x0 + 0.3 + t * step, 5.35), step * 0.85, 0.55,
                               fc=colours["cls" if is_cls else "patch"], ec="#444444", lw=0.7))
        ax.add_patch(Rectangle((x0 + 0.3 + t * step, 4.6), step * 0.85, 0.55, fc=colours["pos"], ec="#444444",
                               lw=0.7))
        ax.text(x0 + 0.3 + (t + 0.425) * step, 4.875, label if label != "cls" else "0", ha="center", va="center",
                fontsize=7)
        ax.text(x0 + 0.3 + (t + 0.425) * step, 5.625, "*" if is_cls else "", ha="center", va="center", fontsize=8)
    ax.text(cx, 6.2, (r"[class token $\mathbf{x}_{class}$ (*); the patches]" if cls else "the patches (no class token)")
            + r" + positions $\mathbf{E}_{pos}$", ha="center", va="center", fontsize=10)
    tag(x0 + w + 0.15, 5.4, "Eq. 1")
    arrow(cx, 6.6, cx, 7.2, shape["tokens"] + r"  $\mathbf{z}_0$")
    enc_y, enc_h = 7.2, 2.5
    box(x0, enc_y, w, enc_h, f"Transformer encoder\nL = {L} blocks\n(the same block {L} times, each with\n"
        f"its own weights: right)", colours["encoder"], size=10.5)
    tag(x0 + w + 0.15, enc_y + enc_h / 2, "Eqs. 2-3")
    arrow(cx, enc_y + enc_h, cx, 10.4, shape["tokens"] + r"  $\mathbf{z}_L$")
    pooling = r"take token 0 ($\mathbf{z}_L^0$), then LayerNorm" if cls else "average the tokens, then LayerNorm"
    box(x0, 10.4, w, 1.0, pooling, colours["norm"])
    tag(x0 + w + 0.15, 10.9, "Eq. 4")
    arrow(cx, 11.4, cx, 12.1, shape["y"] + r"  $\mathbf{y}$")
    box(x0, 12.1, w, 1.0, f"head: Linear({c['representation_size'] or D} -> {K})" +
        (f" after Linear({D} -> {c['representation_size']}) + tanh" if c["representation_size"] else ""),
        colours["head"])
    arrow(cx, 13.1, cx, 13.8, shape["logits"] + f"  scores for {K} classes")
    ax.text(cx, 14.15, "class prediction", ha="center", va="center", fontsize=10.5)

    # Right: one encoder block, bottom to top -----------------------------------------------------------------------
    bx, bw = 14.2, 5.2
    bcx = bx + bw / 2
    ax.text(bcx + 0.4, 16.35, f"one encoder block (x {L})", ha="center", va="center", fontsize=13, weight="bold")
    ax.add_patch(FancyBboxPatch((bx - 0.7, 1.2), bw + 2.9, 14.0, boxstyle="round,pad=0.02,rounding_size=0.3",
                                fc="#f7f7f7", ec="#888888", lw=1.0, ls="--"))
    for y in (enc_y, enc_y + enc_h):  # dashed lines from the encoder box to its zoom
        ax.plot([x0 + w + 1.45, bx - 0.7], [y, 1.2 if y == enc_y else 15.2], color="#888888", lw=0.8, ls="--")
    ax.text(bcx, 0.75, r"$\mathbf{z}_{\ell-1}$", ha="center", va="center", fontsize=11)
    arrow(bcx, 1.0, bcx, 2.3, shape["tokens"], at=0.75)
    box(bx, 2.3, bw, 0.9, "LayerNorm", colours["norm"])
    arrow(bcx, 3.2, bcx, 3.9)
    box(bx, 3.9, bw, 1.2, f"multi-head self-attention\nk = {k} heads of D/k = {D // k}", colours["msa"])
    arrow(bcx, 5.1, bcx, 5.75)
    residual(1.4, 6.05, 4.0, "Eq. 2")
    arrow(bcx, 6.35, bcx, 7.6, shape["tokens"] + r"  $\mathbf{z}'_\ell$", at=0.72)
    box(bx, 7.6, bw, 0.9, "LayerNorm", colours["norm"])
    arrow(bcx, 8.5, bcx, 9.2)
    box(bx, 9.2, bw, 1.9, f"MLP\nLinear({D} -> {M}), GELU\nLinear({M} -> {D})\n", colours["mlp"])
    ax.text(bcx, 9.5, shape["mlp_hidden"] + " inside", ha="center", va="center", fontsize=8.5,
            family="monospace", color="#1a4f8a")
    arrow(bcx, 11.1, bcx, 11.95)
    residual(6.6, 12.25, 9.6, "Eq. 3")
    arrow(bcx, 12.55, bcx, 13.8, shape["tokens"] + r"  $\mathbf{z}_\ell$")
    ax.text(bcx, 14.15, r"$\mathbf{z}_\ell$, to the next block", ha="center", va="center", fontsize=10.5)

    # Far right: the equations --------------------------------------------------------------------------------------
    ex = 22.4
    ax.text(ex, 16.35, "the equations", ha="left", va="center", fontsize=13, weight="bold")
    equations = [
        ("Eq. 1", r"$\mathbf{z}_0 = [\mathbf{x}_{class};\,\mathbf{x}_p^1\mathbf{E};\,\ldots;\,"
                  r"\mathbf{x}_p^N\mathbf{E}] + \mathbf{E}_{pos}$"),
        ("Eq. 2", r"$\mathbf{z}'_\ell = \mathrm{MSA}(\mathrm{LN}(\mathbf{z}_{\ell-1})) + \mathbf{z}_{\ell-1}$"),
        ("Eq. 3", r"$\mathbf{z}_\ell = \mathrm{MLP}(\mathrm{LN}(\mathbf{z}'_\ell)) + \mathbf{z}'_\ell$"),
        ("Eq. 4", r"$\mathbf{y} = \mathrm{LN}(\mathbf{z}_L^0)$"),
    ]
    for i, (name, equation) in enumerate(equations):
        ax.text(ex, 15.2 - i * 1.2, name, ha="left", va="center", fontsize=10, color="#990000", style="italic")
        ax.text(ex, 14.7 - i * 1.2, equation, ha="left", va="center", fontsize=10.5)
    notes = [f"N = HW / P^2 = {N} patches", f"D = {D} (hidden size)", f"L = {L} layers, k = {k} heads",
             f"MLP size {M}"]
    for i, note in enumerate(notes):
        ax.text(ex, 9.6 - i * 0.55, note, ha="left", va="center", fontsize=10)
    ax.text(ex, 6.9, "shapes: (batch, tokens, values)\nin blue, after each step", ha="left", va="center",
            fontsize=9.5, color="#1a4f8a")
    fig.tight_layout()
    return fig


def plot_bug_vs_fix(runs: dict[str, dict[str, list[float]]], title: str | None = None, num_classes: int = 10):
    """Training loss and test accuracy per epoch of several runs (label -> results of ``train``), with ln(C), the
    loss of a model that has learned nothing, as a dashed line. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    for label, results in runs.items():
        epochs = range(1, len(results["train_loss"]) + 1)
        ax_loss.plot(epochs, results["train_loss"], marker="o", label=label)
        ax_acc.plot(epochs, results["test_acc"], marker="o", label=label)
    ax_loss.axhline(math.log(num_classes), color="grey", linestyle="--", label=f"ln({num_classes})")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # whole epochs
    # One legend for both panels (the same colours), outside them so it hides no curve
    fig.legend(*ax_loss.get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_fix_sequences(sequences: dict[str, dict[str, dict[str, list[float]]]], title: str | None = None,
                       num_classes: int = 10):
    """Final training loss and test accuracy after each step of one or more sequences of fixes (sequence name ->
    {step label -> results of ``train``}, in order), one line per sequence; on the loss panel each point is labelled
    with its step (the first sequence's labels above its points, the next one's below). Returns the figure."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw=dict(width_ratios=[3, 2]))
    labelled = set()
    for k, (name, steps) in enumerate(sequences.items()):
        losses = [results["train_loss"][-1] for results in steps.values()]
        accuracies = [results["test_acc"][-1] for results in steps.values()]
        line, = ax_loss.plot(range(len(steps)), losses, marker="o", label=name)
        ax_acc.plot(range(len(steps)), accuracies, marker="o", label=name, color=line.get_color())
        for x, (label, value) in enumerate(zip(steps, losses)):
            if (x, label, value) not in labelled:  # a point both sequences share is labelled once
                labelled.add((x, label, value))
                ax_loss.annotate(label, (x, value), textcoords="offset points", xytext=(4, 7 if k % 2 == 0 else -13),
                                 fontsize=7, color=line.get_color())
        ax_loss.set_xlim(-0.3, len(steps) - 0.3 + 0.6)  # room for the last labels
        for ax in (ax_loss, ax_acc):
            ax.set_xticks(range(len(steps)))
    ax_loss.axhline(math.log(num_classes), color="grey", linestyle="--", label=f"ln({num_classes})")
    ax_loss.set(xlabel="fixes applied", ylabel="final training loss", title="training loss after the last epoch",
                ylim=(0, math.log(num_classes) + 0.4))
    ax_acc.set(xlabel="fixes applied", ylabel="test accuracy", title="test accuracy after the last epoch", ylim=(0, 1))
    ax_loss.legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
