"""``vla-edge train-tiny``: fit a tiny LLaVA-VLA-shaped model to recorded episodes on a CPU, in minutes.

Data: HDF5 episodes in the Cobot Magic layout of :mod:`vla_edge.edge.episodes.format` (what
``vla-edge run --record`` and :func:`vla_edge.edge.sim.evaluate.record_expert_episodes` write): each
camera's frames, ``qpos`` and ``action``, attribute ``instruction``. With ``--record N`` the scripted
expert of the simulated reach task (:mod:`vla_edge.edge.sim.task`) records N episodes into ``--data`` first.

Every tick ``t`` with five actions after it is one sample, exactly as the runtime will see it
(CONTRACT section 1): the three camera views composed into one 384 px image
(:func:`vla_edge.kernels.compose_views` with the checkpoint's image layout), the ChatML prompt
(:class:`~vla_edge.edge.bundle.prompt.PromptTemplate`: prefix, image embeddings, instruction, 14 proprio tokens,
suffix), then the 70 action tokens of ``action[t : t + 5]`` and ``<|im_end|>``. The loss is the
cross-entropy of those 71 tokens (teacher forcing), plus, when the episodes record where their target
was (``target_xy_m``, as the simulated task's do), a training-only :class:`TargetProbe` loss that makes
the model encode the target's position; the probe's heads are not exported.

Normalisation statistics come from the data: action bounds are the per-dimension min/max of ``action``
(widened by 5 % of the range, at least 0.01, within the Piper's limits); the proprio statistics are
derived from the same range (mean = mid-range, std = range / 6) so that a state and an action of the
same value fall in the same bin. The model (:func:`policy_model_config`) is the LLaVA-VLA architecture at
a small size: 32 px patches (144 image tokens instead of 729, so a step is fast on a CPU) and a 128-wide
decoder with head size 32 (so the export picks the fused GQA decoder, the real model's path); the bin rows of the (tied)
token table start as smooth Fourier features of the bin value, so neighbouring bins start close and
the output head is ordinal from the first step. AdamW, warm-up then cosine decay.

**LLaVA-VLA data** (``--data`` with a ``data.json``, e.g. ``vla-edge convert``'s): read and encoded as the reference
trainer does (:mod:`vla_edge.tools.llava_data`, which says how to smoke-test a dataset). The target probe is on
when every sample carries ``target_xy_m`` (convert copies it from simulated episodes; the reference trainer
ignores the key); its decoder head reads the positions after the image. The checkpoint carries no statistics,
like the trainer's (export it with ``--stats data/statistics.yaml``), unless ``with_stats`` (``--with-stats``):
then it records the data's ``statistics.yaml`` and ``vla_edge.json`` (bounds, proprio moments, the action
encoding, the state padding, the image layout) as its ``policy`` and ``image_layout``, and ``vla-edge export``
needs no ``--stats`` (as ``vla-edge demo`` exports its policy; ``vla_edge.tools.make_demo_policy`` trains that way).

Output: a vla-edge wrapper checkpoint (``best.pt``) that ``vla-edge export`` takes like any other
(``torch.load(weights_only=True)`` safe).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from vla_edge import VlaEdgeError, kernels
from vla_edge.edge.bundle.prompt import PromptTemplate, tokenizer_encoder
from vla_edge.edge.bundle.spec import COBOT_MAGIC_LAYOUT, PIPER_JOINT_HI, PIPER_JOINT_LO, PolicySpec
from vla_edge.edge.episodes.convert import target_xy_m_attr
from vla_edge.edge.episodes.format import EPISODE_GLOB, EpisodeReader, episode_paths
from vla_edge.edge.sim.evaluate import record_expert_episodes
from vla_edge.export.checkpoint import file_sha256, load_checkpoint
from vla_edge.export.config import ModelConfig, TextConfig, VisionConfig
from vla_edge.export.demo import SHIPPED_POLICY  # noqa: F401  (re-exported)
from vla_edge.export.stats import read_statistics
from vla_edge.export.tiny import build_tiny_tokenizer, tiny_token_spec
from vla_edge.kernels.reference import bin_edges, tokenize_proprio
from vla_edge.tools.llava_data import JsonBatcher, LlavaData

log = logging.getLogger(__name__)

CHUNK = 5
ACTION_DIM = 14


def policy_model_config(vocab_rows: int):
    return ModelConfig(
        vision=VisionConfig(hidden=64, intermediate=128, layers=2, heads=2, patch=32, image_size=384),
        text=TextConfig(hidden=128, intermediate=384, layers=3, heads=4, kv_heads=2, vocab_rows=vocab_rows,
                        max_positions=2048),
    )


# -- data --------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    """Samples of every episode: composed pixels (uint8, S x S x 3), proprio state, 5-step action chunks."""

    images: np.ndarray  # (n, S, S, 3) uint8
    qpos: np.ndarray  # (n, 14) float64
    actions: np.ndarray  # (n, 5, 14) float64
    instructions: list[str]  # per sample
    episodes: int
    all_qpos: np.ndarray  # every recorded tick, for the statistics
    all_actions: np.ndarray
    targets_xy_m: np.ndarray | None = None  # (n, 2) the episode's target, when every episode records one


def episode_files(data_dir: str | Path) -> list[Path]:
    """The ``episode_<n>.hdf5`` files of ``data_dir`` in episode order."""
    files = episode_paths(data_dir)
    if not files:
        raise VlaEdgeError(f"no {EPISODE_GLOB} files in {data_dir} (record some: vla-edge train-tiny --record N)")
    return files


def load_dataset(data_dir: str | Path, layout, max_episodes: int = 0, progress=None) -> Dataset:
    """Read the episodes and compose each tick's views once (uint8, the model's input before scaling)."""
    files = episode_files(data_dir)
    if max_episodes:
        files = files[:max_episodes]
    images, qpos, actions, instr, all_q, all_a, targets = [], [], [], [], [], [], []
    composer = None
    for path in files:
        with EpisodeReader(path, layout.cameras) as r:  # qpos, action and the layout's cameras, or an error
            q = r.qpos().astype(np.float64)
            a = r.action().astype(np.float64)
            text = r.instruction()
            target = target_xy_m_attr(path, r.attrs.get("target_xy_m"))
            if not text:
                raise VlaEdgeError(f"{path}: no 'instruction' attribute")
            all_q.append(q)
            all_a.append(a)
            for t in range(len(q) - CHUNK + 1):
                frames = r.frames(t)  # (H, W, 3) uint8 RGB; the stock recorder's JPEG rows decoded
                if composer is None:
                    composer = kernels.Composer(layout, [fr.shape[:2] for fr in frames])
                images.append(np.asarray(composer.compose_uint8(frames)))
                qpos.append(q[t])
                actions.append(a[t : t + CHUNK])
                instr.append(text)
                targets.append(target)
        if progress is not None:
            progress()
    if not images:
        raise VlaEdgeError(f"{data_dir}: episodes too short (need at least {CHUNK} ticks)")
    known = all(t is not None for t in targets)
    return Dataset(np.stack(images), np.stack(qpos), np.stack(actions), instr, len(files),
                   np.concatenate(all_q), np.concatenate(all_a),
                   np.asarray(targets, dtype=np.float64) if known else None)


def statistics(ds: Dataset):
    """PolicySpec with bounds and proprio statistics computed from the data."""
    lo = np.minimum(ds.all_actions.min(0), ds.all_qpos.min(0))
    hi = np.maximum(ds.all_actions.max(0), ds.all_qpos.max(0))
    margin = np.maximum(0.05 * (hi - lo), 0.01)
    lim_lo, lim_hi = np.array(PIPER_JOINT_LO * 2), np.array(PIPER_JOINT_HI * 2)
    lo, hi = np.maximum(lo - margin, lim_lo), np.minimum(hi + margin, lim_hi)
    # Proprio statistics put a joint value in the same bin as an action of that value:
    # x = (s - mean) / (std + 1e-5) / 3 equals (a - lo) / (hi - lo) * 2 - 1 for mean = mid-range and
    # std = range / 6 - 1e-5. Then "the next target is near the current state" is "the next token is
    # near the proprio token", which a small model learns in minutes.
    mean, std = (lo + hi) / 2, (hi - lo) / 6 - 1e-5
    return PolicySpec(chunk_size=CHUNK, action_dim=ACTION_DIM, state_dim=ACTION_DIM, action_lo=lo.tolist(),
                      action_hi=hi.tolist(), proprio_mean=mean.tolist(), proprio_std=std.tolist())


def encode_actions(actions: np.ndarray, policy, vocab_base: int) -> np.ndarray:
    """(..., 5, 14) absolute actions -> (..., 70) token ids, step-major (CONTRACT: min-max, 256 bins)."""
    lo, hi = np.asarray(policy.action_lo), np.asarray(policy.action_hi)
    x = np.clip((actions - lo) / (hi - lo) * 2 - 1, -1, 1)
    i = np.digitize(x, bin_edges())
    return (vocab_base - i).reshape(*actions.shape[:-2], -1).astype(np.int64)


# -- model -------------------------------------------------------------------------------------------
def build_model(tokens, seed: int):
    import torch  # torch: the [export] extra
    from vla_edge.export.model import LlavaVLA  # imports torch at its top

    torch.manual_seed(seed)
    model = LlavaVLA(policy_model_config(tokens.embedding_rows), attn="sdpa")
    with torch.no_grad():
        emb = model.lm.model.embed_tokens.weight  # tied with the output head
        hidden = emb.shape[1]
        value = torch.linspace(1, -1, tokens.n_bins)[:, None]  # row V-256+j holds bin 256-j: descending values
        freqs = torch.arange(1, hidden // 2 + 1, dtype=torch.float32)[None, :] * (math.pi / 4)
        feats = torch.cat([torch.sin(freqs * value), torch.cos(freqs * value)], dim=1)[:, :hidden]
        feats = feats * (0.5 / math.sqrt(hidden / 2))  # rows of norm ~0.5
        emb[tokens.vocab_base - tokens.n_bins : tokens.vocab_base] = feats + 0.02 * torch.randn_like(feats)
    if model.cfg.text.tie_word_embeddings:
        model.lm.tie_weights()
    return model


class Batcher:
    """Builds ``inputs_embeds`` and labels for a batch: prefix | image | instruction | proprio | suffix | actions."""

    def __init__(self, model, ds: Dataset, policy, tokens, tokenizer_json: str):
        encode = tokenizer_encoder(tokenizer_json)
        self.model, self.ds, self.tokens = model, ds, tokens
        self.prompt = PromptTemplate.build(encode, tokens)
        mean, std = np.asarray(policy.proprio_mean), np.asarray(policy.proprio_std)
        instr = {s: self.prompt.instruction_ids(encode, s, False) for s in set(ds.instructions)}
        actions = encode_actions(ds.actions, policy, tokens.vocab_base)
        self.after = []  # per sample: ids after the image, and how many of them are targets
        for k in range(len(ds.qpos)):
            proprio = tokenize_proprio(ds.qpos[k], mean, std, tokens.vocab_base).tolist()
            target = actions[k].tolist() + [tokens.im_end]
            self.after.append((instr[ds.instructions[k]] + proprio + self.prompt.suffix + target, len(target)))

    def __call__(self, idx):
        import torch  # torch: the [export] extra

        m = self.model
        pixels = torch.from_numpy(self.ds.images[idx]).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        image = m.image_embeds(pixels)  # (B, 730, H)
        prefix = m.embed_tokens(torch.tensor(self.prompt.prefix))[None].expand(len(idx), -1, -1)
        rows = [self.after[i] for i in idx]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(idx), width), self.tokens.im_end, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for b, (after, n_target) in enumerate(rows):
            ids[b, : len(after)] = torch.tensor(after)
            mask[b, : len(after)] = 1
            labels[b, len(after) - n_target : len(after)] = ids[b, len(after) - n_target : len(after)]
        embeds = torch.cat([prefix, image, m.embed_tokens(ids)], dim=1)
        n_before = prefix.shape[1] + image.shape[1]
        attn = torch.cat([torch.ones((len(idx), n_before), dtype=torch.long), mask], dim=1)
        full_labels = torch.cat([torch.full((len(idx), n_before), -100, dtype=torch.long), labels], dim=1)
        return embeds, attn, full_labels, image


class TargetProbe:
    """Training-only auxiliary loss: where is the target? (Used when the episodes record ``target_xy_m``.)

    Two linear heads regress the episode's target position (standardised x, y): one from the mean of the
    image embeddings, one from the decoder's last hidden state at every position that emits an action
    token. The first makes the vision trunk encode where the disc is in every patch, the second makes the
    decoder carry that to where it decides; without them a tiny model trained for minutes learns the
    common motion and ignores the few red patches. The heads are not part of the checkpoint: the exported
    graph is the plain LLaVA-VLA.
    """

    def __init__(self, hidden: int, targets_xy_m: np.ndarray, weight: float):
        import torch  # torch: the [export] extra

        standardised = (targets_xy_m - targets_xy_m.mean(0)) / (targets_xy_m.std(0) + 1e-3)
        self.targets = torch.from_numpy(standardised).float()
        self.image_head = torch.nn.Linear(hidden, 2)
        self.decoder_head = torch.nn.Linear(hidden, 2)
        self.weight = weight

    def parameters(self):
        return [*self.image_head.parameters(), *self.decoder_head.parameters()]

    def loss(self, image, last_hidden, labels, idx, after_image=None):
        """Mean squared error of both heads (standardised units) for the samples ``idx``; ``after_image``: per
        sample, the first position after the image (the decoder head reads no labelled position before it)."""
        import torch  # torch: the [export] extra
        import torch.nn.functional as F  # torch: the [export] extra

        y = self.targets[idx]
        from_image = self.image_head(image[:, :-1].mean(1))  # patches only, not image_newline
        emits = labels[:, 1:] != -100  # position p emits the token at p + 1
        if after_image is not None:  # LLaVA-VLA data labels a few prompt tokens before the image too
            emits &= torch.arange(emits.shape[1])[None, :] >= after_image[:, None]
        h = last_hidden[:, :-1][emits]  # (n_action_positions, H)
        rows = emits.nonzero()[:, 0]
        return F.mse_loss(from_image, y) + F.mse_loss(self.decoder_head(h), y[rows])


def loss_of(model, batch, probe: TargetProbe | None = None, idx=None):
    """Cross-entropy of the action tokens (plus ``probe``'s weighted loss); returns ``(total, ce, aux)``."""
    import torch.nn.functional as F  # torch: the [export] extra

    embeds, attn, labels, image, *after_image = batch  # JsonBatcher adds where each image ends
    out = model.lm(inputs_embeds=embeds, attention_mask=attn, output_hidden_states=probe is not None)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    if probe is None:
        return ce, ce, None
    aux = probe.loss(image, out.hidden_states[-1], labels, idx, *after_image)
    return ce + probe.weight * aux, ce, aux


# -- training ----------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    path: Path
    losses: list[float]
    seconds: float
    samples: int
    episodes: int
    probe_losses: list[float]  # the TargetProbe's loss per step (empty when it was off)


def train(data_dir: str | Path, out: str | Path, *, steps: int = 1500, batch: int = 8, lr: float = 2e-3,
          seed: int = 0, max_episodes: int = 0, threads: int = 0, progress: bool = True,
          init: str | Path | None = None, aux_weight: float = 1.0, with_stats: bool = False) -> TrainResult:
    """Train on the episodes in ``data_dir`` and write the wrapper checkpoint to ``out``.

    ``init``: start from this checkpoint's weights (one written by this function) instead of a fresh model.
    ``aux_weight``: weight of the :class:`TargetProbe` loss (used when the episodes record their target; 0: off).
    ``with_stats``: LLaVA-VLA data: record its statistics.yaml and vla_edge.json in the checkpoint (module
    docstring), so that it exports without ``--stats``.
    """
    import torch  # torch: the [export] extra

    if threads:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    layout = COBOT_MAGIC_LAYOUT
    tokenizer_json = build_tiny_tokenizer()
    tokens = tiny_token_spec(tokenizer_json)
    t0 = time.monotonic()
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn())
    llava = (Path(data_dir) / "data.json").is_file()  # LLaVA-VLA data: statistics and layout stay with the data
    with Progress(*cols, console=console, disable=not progress) as bar:
        if llava:
            job = bar.add_task("reading data.json", total=None)
            ds = LlavaData.load(data_dir, tokenizer_json, tokens, layout.output, progress=lambda: bar.advance(job))
        else:
            n_files = len(episode_files(data_dir)[: max_episodes or None])
            job = bar.add_task("reading episodes", total=n_files)
            ds = load_dataset(data_dir, layout, max_episodes, progress=lambda: bar.advance(job))
    policy = None if llava else statistics(ds)
    out_layout = None if llava else layout
    if llava and with_stats:  # the data's own statistics, action encoding, state padding and layout
        data_stats = read_statistics(Path(data_dir) / "statistics.yaml")
        policy = data_stats.policy(chunk_size=CHUNK, actions=data_stats.actions or "raw")
        out_layout = data_stats.layout or layout
    init_sha256 = file_sha256(Path(init)) if init else None  # the file as it was read (a chain of fine-tunes)
    if init is None:
        model = build_model(tokens, seed)
    else:  # the checkpoint's own shape, which may be an older policy shape
        from vla_edge.export.model import LlavaVLA  # imports torch at its top

        model = LlavaVLA.from_checkpoint(load_checkpoint(init), attn="sdpa")
    model.train()
    batcher = JsonBatcher(model, ds) if llava else Batcher(model, ds, policy, tokens, tokenizer_json)
    probe = None
    if aux_weight > 0 and ds.targets_xy_m is not None:
        probe = TargetProbe(model.cfg.text.hidden, ds.targets_xy_m, aux_weight)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    other += probe.parameters() if probe is not None else []
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, min(100, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    rng = np.random.default_rng(seed)
    n = len(ds.images)
    losses: list[float] = []
    console.print(f"train-tiny: {ds.episodes} episodes, {n} samples, {steps} steps of {batch}, "
                  f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
                  + (f"target probe weight {aux_weight:g}" if probe else "no target probe"))
    aux_losses: list[float] = []
    with Progress(*cols, TextColumn("loss {task.fields[loss]}"), console=console, disable=not progress) as bar:
        job = bar.add_task("training", total=steps, loss="-")
        order = rng.permutation(n)
        pos = 0
        for step in range(steps):
            if pos + batch > n:
                order, pos = rng.permutation(n), 0
            idx = order[pos : pos + batch]
            pos += batch
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            total, ce, aux = loss_of(model, batcher(idx), probe, idx)
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            losses.append(ce.item())
            aux_losses.append(aux.item() if aux is not None else float("nan"))
            bar.update(job, advance=1, loss=f"{np.mean(losses[-20:]):.3f}")
            if (step + 1) % 50 == 0:
                log.info("step %d/%d loss %.3f target probe %.3f (%.0f s)", step + 1, steps, np.mean(losses[-50:]),
                         np.mean(aux_losses[-50:]), time.monotonic() - t0)
    path = write_checkpoint(model, policy, tokens, tokenizer_json, out_layout, out,
                            meta={"data": str(data_dir), "episodes": ds.episodes, "samples": n, "steps": steps,
                                  "batch": batch, "lr": lr, "seed": seed, "aux_weight": aux_weight if probe else 0.0,
                                  "init": str(init) if init else None,
                                  "init_sha256": init_sha256,
                                  "statistics": "data" if llava and with_stats else ("derived" if not llava else None),
                                  "final_loss": float(np.mean(losses[-20:]))})
    return TrainResult(path=path, losses=losses, seconds=time.monotonic() - t0, samples=n, episodes=ds.episodes,
                       probe_losses=aux_losses if probe is not None else [])


def write_checkpoint(model, policy, tokens, tokenizer_json: str, layout, out, meta: dict, fp16: bool = True) -> Path:
    """The vla-edge wrapper (README, "Checkpoints"); tensors stored fp16 by default to keep it small.
    ``policy``/``layout`` None: left out (LLaVA-VLA data without ``with_stats``: they stay with the data)."""
    import torch  # torch: the [export] extra

    sd = model.llava_state_dict()
    if fp16:
        sd = {k: v.half() for k, v in sd.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({
        "format": "vla-edge-ckpt", "version": 1, "state_dict": sd, "model": model.cfg.to_dict(),
        **({"policy": policy.to_dict()} if policy is not None else {}),
        **({"image_layout": layout.to_dict()} if layout is not None else {}),
        "tokens": tokens.to_dict(), "tokenizer_json": tokenizer_json, "training": json.dumps(meta),
    }, tmp)
    tmp.replace(out)
    return out


def main(args) -> int:
    console = Console(stderr=True)
    if args.record:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            job = bar.add_task("recording expert episodes", total=args.record)
            results = record_expert_episodes(args.data, args.record, first_seed=args.record_seed,
                                             progress=lambda r: bar.advance(job))
        ok = sum(r.success for r in results)
        console.print(f"recorded {len(results)} expert episodes into {args.data} ({ok} successful)")
    llava = (Path(args.data) / "data.json").is_file()
    with_stats = getattr(args, "with_stats", False)
    if with_stats and not llava:
        raise VlaEdgeError("--with-stats is for LLaVA-VLA data (a data.json); HDF5 episodes' statistics are always "
                           "recorded in the checkpoint")
    stats = f" --stats {Path(args.data) / 'statistics.yaml'}" if llava and not with_stats else ""
    res = train(args.data, args.out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                max_episodes=args.max_episodes, init=args.init, aux_weight=args.aux_weight, with_stats=with_stats)
    console.print(f"[green]wrote[/] {res.path} ({res.path.stat().st_size / 1e6:.2f} MB) after {res.seconds:.0f} s; "
                  f"loss {np.mean(res.losses[:20]):.3f} -> {np.mean(res.losses[-20:]):.3f}. "
                  f"Next: vla-edge export --ckpt {res.path}{stats} --out bundle/")
    return 0
