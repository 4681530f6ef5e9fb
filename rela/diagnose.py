"""Transportability diagnostics (``rela diagnose``) and label-free prior ranking (``rela rank-priors``).

ReLA rests on two claims: representations of different models are linearly
transportable into one another, and a prior's PCA-standardised outputs make good
regression targets. :func:`diagnose` measures both for a set of models on one
dataset; :func:`rank_priors` orders candidate priors by a score that needs no
labels and no SSL training, so it can choose a prior for unlabelled data.

Definitions (all on the training split; ``Z`` = a model's transported targets,
:func:`rela.targets.transport` with m = min(learner dim, prior dim)):

- ``explained_variance``: fraction of the raw features' variance in the m kept
  principal components.
- ``class_spread``: tr(S_W) / tr(S_T) of ``Z``: the mean squared distance of a
  target to its class mean over the mean squared distance to the global mean.
  0 means every class collapses to one point, 1 means classes are not separated
  at all (labels are used here for diagnosis only).
- ``knn_top1``: weighted cosine k-NN (k=200, :func:`rela.evaluate.knn_accuracy`)
  of the raw features, bank of the training split, queries from the test split.
- ``r2[A][B]``: held-out R^2 of a ridge map from A's raw features (standardised)
  to B's raw features: fit on a random 80 % of the images, the ridge strength
  chosen by closed-form leave-one-out error on that 80 %, scored on the other
  20 % as 1 - SSE / SST summed over B's dimensions (the fraction of B's variance
  the map predicts). Not symmetric.
- ``cka[A][B]``: linear CKA (Kornblith et al., 2019) of the raw features,
  ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F); symmetric, in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rela.backbones import build_backbone
from rela.bank import load_or_extract
from rela.build import prior_for
from rela.console import console_scope
from rela.data import RELA_VIEW, ImageDataset
from rela.errors import RelaError, unknown
from rela.evaluate import knn_accuracy
from rela.features import embed
from rela.io import atomic_write, save_json, save_text
from rela.plotting import pyplot, require_plots
from rela.priors import Prior
from rela.targets import transport

RIDGE_GRID = tuple(10.0 ** e for e in range(-6, 3))  # ridge strength relative to the mean eigenvalue


@dataclass
class Candidate:
    """A model under study: its spec as the user wrote it and the prior built from it."""

    spec: str
    prior: Prior


def parse_weights(pairs: list[str] | None) -> dict[str, str]:
    """``SPEC=FILE`` pairs (the ``--prior-weights`` of a multi-model command) -> {spec: file}."""
    out = {}
    for pair in pairs or []:
        spec, sep, path = pair.partition("=")
        if not sep or not spec or not path:
            raise RelaError(f"--prior-weights takes SPEC=FILE pairs, got {pair!r}")
        out[spec] = path
    return out


def build_candidates(specs: list[str], dataset: ImageDataset, *, backbone: str = "convnet", seed: int = 0,
                     weights: dict[str, str] | None = None) -> list[Candidate]:
    """Build every prior before any work starts, so one bad spec fails the command up front."""
    if not specs:
        raise RelaError("name at least one model")
    if len(set(specs)) != len(specs):
        raise RelaError(f"a model is named twice in {specs}")
    weights = weights or {}
    unused = sorted(set(weights) - set(specs))
    if unused:
        raise RelaError(f"--prior-weights names {unused[0]!r}, which is not one of the models")
    out = []
    for spec in specs:
        if spec == "none":
            raise RelaError("'none' is not a model; name a prior (random, checkpoint:PATH, timm:NAME, ...)")
        out.append(Candidate(spec, prior_for(spec, dataset, learner_arch=backbone, seed=seed,
                                             weights=weights.get(spec))))
    return out


def learner_dim(backbone: str, dataset: ImageDataset) -> int:
    return build_backbone(backbone, dataset.channels, dataset.image_size)[1]


# --- statistics ------------------------------------------------------------------------------------


def class_spread(targets: torch.Tensor, labels: torch.Tensor) -> float:
    """tr(S_W) / tr(S_T): within-class share of the targets' total variance (0 = tight classes)."""
    z = targets.double()
    total = (z - z.mean(0)).pow(2).sum()
    if total <= 0:
        return float("nan")
    means = torch.zeros(int(labels.max()) + 1, z.shape[1], dtype=z.dtype).index_add_(0, labels, z)
    means /= torch.bincount(labels, minlength=len(means)).clamp_min(1).unsqueeze(1).to(z.dtype)
    return float((z - means[labels]).pow(2).sum() / total)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two N x k feature matrices (same images, same order)."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / denom) if denom > 0 else float("nan")


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant columns stay zero
    return (train - mean) / std, (test - mean) / std


def ridge_r2(x: torch.Tensor, y: torch.Tensor, *, holdout: float = 0.2, seed: int = 0) -> dict:
    """Held-out R^2 of the ridge map x -> y; the strength is chosen by leave-one-out on the fit split.

    With X = U S V^T the ridge solution for strength lam is V diag(s / (s^2 + lam)) U^T Y and
    the leave-one-out residual of sample i is e_i / (1 - h_ii), h_ii = sum_j U_ij^2 s_j^2 / (s_j^2 + lam),
    so the whole grid costs one SVD.
    """
    n = len(x)
    if n < 10:
        raise RelaError(f"need at least 10 images for a held-out R^2, got {n}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    n_test = max(2, round(holdout * n))
    test_idx, fit_idx = order[:n_test], order[n_test:]
    xf, xt = _standardise(x[fit_idx].double(), x[test_idx].double())
    yf, yt = y[fit_idx].double(), y[test_idx].double()
    y_mean = yf.mean(0)
    yf = yf - y_mean
    u, s, vh = torch.linalg.svd(xf, full_matrices=False)
    uty = u.T @ yf
    scale = s.pow(2).mean().clamp_min(1e-30)
    best = None
    for alpha in RIDGE_GRID:
        shrink = s.pow(2) / (s.pow(2) + alpha * scale)
        hat = (u.pow(2) * shrink).sum(1)
        resid = yf - u @ (shrink.unsqueeze(1) * uty)
        loo = (resid / (1 - hat).clamp_min(1e-12).unsqueeze(1)).pow(2).sum()
        if best is None or loo < best[0]:
            best = (loo, alpha)
    alpha = best[1]
    weights = vh.T @ ((s / (s.pow(2) + alpha * scale)).unsqueeze(1) * uty)
    pred = xt @ weights + y_mean
    sst = (yt - yt.mean(0)).pow(2).sum()
    r2 = float(1 - (yt - pred).pow(2).sum() / sst) if sst > 0 else float("nan")
    return {"r2": r2, "alpha": alpha}


# --- diagnose ---------------------------------------------------------------------------------------


def _features(cand: Candidate, data: ImageDataset, cache_dir, device, progress) -> torch.Tensor:
    return load_or_extract(cand.prior, data, cache_dir=cache_dir, device=device, progress=progress)[0]


@console_scope()
def diagnose(candidates: list[Candidate], train_set: ImageDataset, test_set: ImageDataset, *,
             target_dim: int, cache_dir: str | Path = ".cache/rela", pair_samples: int = 10000, seed: int = 0,
             device: str = "cpu", progress: bool = True) -> dict:
    """Per-model target statistics and k-NN, and the pairwise transport fit (see the module doc)."""
    if not train_set.num_classes:
        raise RelaError(f"{train_set.name} has no labels ({train_set.unlabelled}): diagnose scores class labels "
                        "(k-NN, class spread); rank_priors is label-free")
    raw = {c.spec: _features(c, train_set, cache_dir, device, progress) for c in candidates}
    models = []
    for c in candidates:
        feats = raw[c.spec]
        targets = transport(feats, min(target_dim, feats.shape[1]))
        test_feats = _features(c, test_set, cache_dir, device, progress)
        knn = knn_accuracy(feats, train_set.labels, test_feats, test_set.labels, train_set.num_classes)
        models.append({"spec": c.spec, "prior": c.prior.name, "raw_dim": feats.shape[1],
                       "target_dim": targets.values.shape[1], "explained_variance": targets.explained_variance,
                       "class_spread": class_spread(targets.values, train_set.labels),
                       "knn20_top1": knn[20], "knn_top1": knn[200]})
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(train_set), generator=g)[:pair_samples]
    specs = [c.spec for c in candidates]
    r2 = {a: {} for a in specs}
    cka = {a: {} for a in specs}
    for a in specs:
        for b in specs:
            r2[a][b] = ridge_r2(raw[a][rows], raw[b][rows], seed=seed)["r2"]
            cka[a][b] = cka[b][a] if a in cka[b] else linear_cka(raw[a][rows], raw[b][rows])
    return {"dataset": f"{train_set.name}:{train_set.split}", "train_images": len(train_set),
            "test_images": len(test_set), "test_split": test_set.split, "target_dim": target_dim,
            "pair_samples": len(rows), "models": models, "r2": r2, "cka": cka}


def _md_matrix(title: str, matrix: dict, specs: list[str]) -> list[str]:
    lines = [f"{title} (row -> column)", "", "| | " + " | ".join(f"{j}" for j in range(len(specs))) + " |",
             "|---" * (len(specs) + 1) + "|"]
    lines += [f"| {i}: `{a}` | " + " | ".join(f"{matrix[a][b]:.3f}" for b in specs) + " |" for i, a in enumerate(specs)]
    return lines + [""]


def diagnose_markdown(report: dict) -> str:
    specs = [m["spec"] for m in report["models"]]
    lines = [f"# Transportability on {report['dataset']} ({report['train_images']} training images; "
             f"k-NN queries: {report['test_images']} images of {report['test_split']}; pairwise statistics on "
             f"{report['pair_samples']} images)", "",
             "| # | model | raw dim | targets | explained var. | class spread | k-NN top-1 (k=200) |",
             "|---|---|---|---|---|---|---|"]
    for i, m in enumerate(report["models"]):
        lines.append(f"| {i} | `{m['spec']}` | {m['raw_dim']} | {m['target_dim']} | {m['explained_variance']:.3f} "
                     f"| {m['class_spread']:.3f} | {100 * m['knn_top1']:.1f} |")
    lines += ["", *_md_matrix("Held-out ridge R^2", report["r2"], specs), *_md_matrix("Linear CKA", report["cka"], specs)]
    return "\n".join(lines)


def plot_diagnose(report: dict, path: Path) -> None:
    plt = pyplot()

    specs = [m["spec"] for m in report["models"]]
    n = len(specs)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * n, 2.5 + 0.8 * n), squeeze=False)
    for ax, key, title in zip(axes[0], ("r2", "cka"), ("held-out ridge R^2 (row -> column)", "linear CKA")):
        values = [[report[key][a][b] for b in specs] for a in specs]
        im = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
        for i in range(n):
            for j in range(n):
                v = values[i][j]
                ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        color="white" if v < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(n), [str(j) for j in range(n)])
        ax.set_yticks(range(n), [f"{i}: {s[:28]}" for i, s in enumerate(specs)], fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"transportability on {report['dataset']}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def write_diagnose(report: dict, out: str | Path) -> list[Path]:
    require_plots()  # all three files or none
    out = Path(out)
    files = [out / "diagnose.json", out / "diagnose.md", out / "diagnose.png"]
    save_json(report, files[0])
    save_text(diagnose_markdown(report) + "\n", files[1])
    plot_diagnose(report, files[2])
    return files


# --- rank-priors -----------------------------------------------------------------------------------


def _with_intercept(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)


@torch.no_grad()
def target_stability(prior: Prior, bank: torch.Tensor, dataset: ImageDataset, target_dim: int, *,
                     samples: int = 2048, seed: int = 0, device: str = "cpu") -> dict:
    """How well a prior's ReLA target is determined by an augmented view of its image (label-free).

    ReLA regresses the learner's output on an augmented view aug(x) onto the target z(x)
    of the clean image. The paper's analysis says targets train fastest when they have
    small variance given the sample and form a one-to-one sample-target map. Both are
    measured in the prior's own target space (the bank's PCA + standardisation, applied
    to the prior's features of ``samples`` views drawn with ReLA's augmentation):

    - ``stability``: the mean over target components j of
      max(0, 1 - E[(z_j(aug x) - z_j(x))^2] / E[(z_j(x') - z_j(x))^2]) (x' another image):
      the share of each target's spread across images that an augmented view still
      determines (1: the view fixes the target, 0: it tells no more than a random image).
    - ``retrieval`` = how often z(aug x) is closer (cosine) to z(x) than to every other
      target of the bank: the view -> target map is one-to-one.
    """
    m = min(target_dim, bank.shape[1])
    z_bank = transport(bank, m).values.double()
    # The transport is affine in the features; recovering it from (bank, targets) by least squares
    # maps the views into exactly the targets ReLA trains on, whatever transport() does inside.
    affine = torch.linalg.lstsq(_with_intercept(bank), z_bank, driver="gelsd").solution
    live = z_bank.std(0) > 0  # components transport() found dead are all zero
    z_bank = z_bank[:, live]

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:samples]
    # a stream set decodes only the sampled images (before the seeded draws: its loader draws a seed too)
    images = dataset.images[idx] if dataset.images is not None else dataset.take(idx.numpy()).decoded().images
    with torch.random.fork_rng(devices=[]):  # augmentation draws from the global RNG
        torch.manual_seed(seed)
        views = RELA_VIEW(images)
    prior.model.to(device)
    try:
        feats = embed(prior, views, device=device)
    finally:
        prior.model.cpu()
    z_view = (_with_intercept(feats) @ affine)[:, live]
    z_clean = z_bank[idx]
    view_err = (z_view - z_clean).pow(2).mean(0)
    shuffled = z_bank[torch.randperm(len(z_bank), generator=g)[: len(idx)]]
    across = (shuffled - z_clean).pow(2).mean(0)
    # Floored at 0 per component: a low-variance component that standardisation blew up into
    # noise counts as useless, not as minus a large number that would drown the others.
    stability = (1 - view_err / across.clamp_min(1e-30)).clamp_min(0).mean()
    keys = F.normalize(z_bank.float(), dim=1)
    queries = F.normalize(z_view.float(), dim=1)
    nearest = torch.cat([(q @ keys.T).argmax(1) for q in queries.split(256)])
    retrieval = (nearest == idx).double().mean()
    return {"stability": float(stability), "retrieval": float(retrieval),
            "target_dim": int(live.sum()), "samples": len(idx)}


def effective_rank(features: torch.Tensor) -> float:
    """RankMe (Garrido et al., 2023): exp of the entropy of the normalised singular values."""
    s = torch.linalg.svdvals(features.double() - features.double().mean(0))
    p = s / s.sum().clamp_min(1e-30)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


SCORES = ("stability", "retrieval", "effective_rank")


@console_scope()
def rank_priors(candidates: list[Candidate], train_set: ImageDataset, *, target_dim: int,
                cache_dir: str | Path = ".cache/rela", samples: int = 2048, seed: int = 0, device: str = "cpu",
                progress: bool = True, by: str = "stability") -> dict:
    """Score each candidate from its bank (plus one pass over augmented views); best first."""
    if by not in SCORES:
        raise unknown("ranking score", by, SCORES)
    rows = []
    for c in candidates:
        bank = _features(c, train_set, cache_dir, device, progress)
        row = {"spec": c.spec, "prior": c.prior.name, "raw_dim": bank.shape[1],
               **target_stability(c.prior, bank, train_set, target_dim, samples=samples, seed=seed, device=device),
               "effective_rank": effective_rank(bank)}
        rows.append(row)
    rows.sort(key=lambda r: -r[by])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return {"dataset": f"{train_set.name}:{train_set.split}", "train_images": len(train_set), "score": by,
            "target_dim": target_dim, "samples": min(samples, len(train_set)), "priors": rows}


def rank_markdown(report: dict) -> str:
    lines = [f"# Prior ranking on {report['dataset']} ({report['train_images']} images; score: "
             f"{report['score']}; {report['samples']} augmented views; no labels used)", "",
             "| rank | prior | raw dim | targets | stability | retrieval | effective rank |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rank']} | `{r['spec']}` | {r['raw_dim']} | {r['target_dim']} | {r['stability']:.3f} "
              f"| {r['retrieval']:.3f} | {r['effective_rank']:.1f} |" for r in report["priors"]]
    return "\n".join(lines)


def write_rank(report: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    files = [out / "rank_priors.json", out / "rank_priors.md"]
    save_json(report, files[0])
    save_text(rank_markdown(report) + "\n", files[1])
    return files
