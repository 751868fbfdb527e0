"""Pre-train DropPos, watch it learn, evaluate what it learned, and time it.

    python train.py --dataset synthetic --epochs 2           # offline, a minute on a laptop
    python train.py --dataset cifar10                        # pre-train ViT-Tiny/4 on CIFAR-10
    python train.py --resume runs/cifar10-pretrain           # continue a run exactly where it stopped
    python train.py --finetune runs/cifar10-pretrain/checkpoint.pt   # fine-tune what it learned
    python train.py --finetune scratch                       # ... the same from random weights
    python train.py --evaluate runs/cifar10-pretrain/checkpoint.pt        # score it, draw it
    python train.py --location-probe runs/cifar10-pretrain/checkpoint.pt  # how location-aware?
    python train.py --linear-probe runs/cifar10-pretrain/checkpoint.pt    # MAE's linear probe
    python train.py --benchmark                              # images/s, memory, utilisation
    torchrun --nproc_per_node=2 train.py --dataset cifar10   # several processes or GPUs

Checkpoints may come from train.py, the official DropPos code, MAE or timm. The file reads top to
bottom: the command line, the training loop, then what the loop uses (the tasks: pre-training,
fine-tuning, the probes; checkpoints from anywhere; the run folder and exact resume; processes;
data; optimisation; evaluation and pictures; logging), and the benchmark.
"""

import argparse
import fcntl
import functools
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from einops import repeat
from PIL import Image, ImageChops, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate
from torchvision.transforms import v2

import droppos
from droppos import PRESETS, DropPos, ViT, patchify, sigma_at, sincos_pos_embed, unpatchify

DATASETS = {"cifar10": 32, "cifar100": 32, "imagefolder": 224, "synthetic": 32}  # native image size

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "encoder.pt", "reassembly.png", "curves.png",
             "evaluation.json")


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit code 2, never a traceback."""


##############################################################################################
# Part I: how DropPos is trained. The loop, then everything one pre-training step touches.
##############################################################################################


# ============================================================================================
# 1. The loop
# ============================================================================================


def main(argv=None):
    WARNINGS.clear()
    try:
        args = parse_args(argv)
        if args.benchmark:
            benchmark(args)
        else:
            with FolderLock(args):
                (evaluate if args.evaluate else train)(args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: under torchrun the processes' lines stay whole
        sys.stderr.flush()
        raise SystemExit(2)
    except KeyboardInterrupt:  # Ctrl-C before the loop has taken over the signal: nothing to save yet
        sys.stderr.write("\ninterrupted before training started; nothing was saved\n")
        raise SystemExit(128 + signal.SIGINT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args):
    """The loop, for every mode that trains: per step lr -> forward -> backward -> update -> log,
    per epoch evaluate -> summary and curves -> checkpoint. What differs between pre-training,
    fine-tuning and the probes is the task's; what keeps a run safe is behind `run` and `stop`."""
    proc = start_processes(args)
    data = Data(args, proc)
    task = TASKS[mode_of(args)](args, data, proc)
    optimizer = make_optimizer(task.groups, task.betas, proc.device)
    run = RunFolder(args, proc, task, optimizer, data)  # on --resume: weights, optimiser, RNG, step
    if run.epoch == args.epochs:
        return run.finish_complete_run()
    net = wrap_model(task.model, args, proc)  # torch.compile, DistributedDataParallel
    steps = data.stream.steps  # per epoch
    total, warmup = steps * args.epochs, int(args.warmup_epochs * steps)
    base_lr = args.blr * args.batch_size * proc.world / 256
    log = run.open_log(total)
    say_warnings()
    log.header(f"{task.name}{task.source} on {args.dataset}: {data.describe()}; {proc.world} "
               f"process(es) on {proc.device}, {proc.precision} ({proc.precision_why}); "
               f"{task.n_params() / 1e6:.2f}M parameters, lr {base_lr:.2e}, {steps} steps per "
               f"epoch, {args.epochs} epoch{'s' * (args.epochs > 1)}, folder {run.folder}")
    with StopRequest() as stop:
        for epoch in range(run.epoch, args.epochs):  # epochs and steps count from 0 here
            task.model.train()
            first = run.step if epoch == run.epoch else 0  # a resumed epoch goes on where it stopped
            for step, (imgs, labels) in data.stream.epoch(epoch, start_step=first):
                done = epoch * steps + step  # optimiser steps before this one
                lr = lr_at(done, total, warmup, base_lr, args.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]  # layer-wise decay when fine-tuning
                with autocast(proc):
                    loss, acc = task.step(net, imgs, labels, done / total)
                optimizer_step(task.model, optimizer, loss, args.clip_grad, task.clip_each)
                log.step(epoch, step + 1, loss, acc, len(imgs), lr, task.log_fields(done / total))
                stopped = stop.agreed(loss, proc)  # the same answer on every process
                if stopped:
                    run.stop(stopped, epoch, step + 1, stop.signalled)  # saves or explains; exits
            last = epoch + 1 == args.epochs
            results = task.evaluate(last or (epoch + 1) % max(args.knn_every, 1) == 0)
            log.epoch_summary(epoch + 1, results, data.stream.left_out(proc))
            log.draw_curves(task.chance())
            run.save(epoch + 1, 0)
            task.write_outputs(run.folder)
    run.say(f"run complete: {run.folder}")
    return task.model


# ============================================================================================
# 2. The tasks: pre-training, fine-tuning, the probes
# ============================================================================================


class Task:
    """What the loop asks of pre-training and of fine-tuning alike. Each sets, once, its model,
    parameter groups and betas, and says how to take a step and how to evaluate."""

    def __init__(self, args, data, proc):
        self.args, self.data, self.proc = args, data, proc
        self.source = source_line(args)  # where the weights come from, for the start-up line
        self.clip_each = per_parameter_clip(args.recipe, self.mode)
        torch.manual_seed(args.seed)  # the same initial weights on every process

    def n_params(self):
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def chance(self):  # metrics.jsonl key -> its chance value, for curves.png
        return {}

    def log_fields(self, progress):  # extra numbers for the progress line
        return {}

    def write_outputs(self, folder, only_broken=False):  # files besides checkpoint.pt  -> names written
        return []

    def state_dict(self):  # what a checkpoint keeps of the task itself
        return {}

    def load_state_dict(self, state):
        pass


class Pretraining(Task):
    """DropPos: the model, its optimiser settings, its step, the k-NN monitor, and what a
    pre-training run leaves behind besides its checkpoint (encoder.pt, reassembly.png)."""

    name, mode, betas, acc_name, acc_key = ("pre-training", "pretrain", (0.9, 0.95), "pos-acc",
                                            "pos_top1")

    def __init__(self, args, data, proc):
        super().__init__(args, data, proc)
        self.model = build_droppos(model_config(args)).to(proc.device)
        self.groups = param_groups(self.model, args.weight_decay, no_decay=no_decay_rule(args.recipe, self.mode))
        self.vis_imgs = data.picture_images() if proc.rank == 0 else None
        # what the position head predicted on the held-out images, for the picture
        self.beliefs = None

    def sigma(self, progress):
        return sigma_at(self.args.sigma, progress, decay=not self.args.no_sigma_decay)

    def step(self, net, imgs, labels, progress):  # -> loss, position accuracy
        out = net(imgs, self.sigma(progress))
        return out.loss, out.acc

    def log_fields(self, progress):
        return {"sigma": self.sigma(progress)}

    def evaluate(self, due):
        """Every epoch, what the position head predicts on the held-out images (top-1, within one
        cell, distance); k-NN top-1 every --knn-every epochs and at the end."""
        if self.data.held_out is None:
            return {}
        results, self.beliefs = head_positions(self.model, self.data, self.args, self.proc)
        if due and self.args.knn_every:
            results["knn_top1"] = run_knn(self.model.encoder, self.data, self.args, self.proc)
        return results

    def chance(self):
        return dict(chance_of_grid(self.model.grid, "test_pos"),
                    knn_top1=100 / self.data.num_classes,
                    pos_top1=100 / self.model.encoder.num_patches)

    def write_outputs(self, folder, only_broken=False):
        """encoder.pt (timm's key names) and reassembly.png; with only_broken, just those that are
        missing or unreadable.  -> names written."""
        if self.proc.rank != 0:
            return []
        written = []
        enc = folder / "encoder.pt"
        if not (only_broken and readable_state(enc, self.model.encoder.state_dict().keys())):
            atomic_write(enc, lambda f: torch.save(self.model.encoder.state_dict(), f))
            written.append(enc.name)
        png = folder / "reassembly.png"
        if self.vis_imgs is not None and not (only_broken and readable_png(png)):
            if self.beliefs is None and self.proc.world == 1:  # a finished run mending its picture
                self.evaluate(due=False)  # (under torchrun that would need every process)
            beliefs = (self.beliefs or {}).get("test_pos")
            save_reassembly(self.model, self.vis_imgs, png, self.proc, beliefs)
            written.append(png.name)
        return written


class Finetuning(Task):
    """A classifier on the pre-trained (or a random) encoder: MAE's fine-tuning recipe, layer-wise
    lr decay, MixUp/CutMix, label smoothing, and top-1 on the held-out images every epoch."""

    name, mode, betas, acc_name, acc_key = ("fine-tuning", "finetune", (0.9, 0.999), "train top-1",
                                            "train_top1")

    def __init__(self, args, data, proc):
        super().__init__(args, data, proc)
        self.model = build_classifier(args, data.num_classes).to(proc.device)
        depth = len(self.model.encoder.blocks)
        self.groups = param_groups(self.model, args.weight_decay,
                                   lambda n: args.layer_decay ** (depth + 1 - layer_id(n, depth)),
                                   no_decay=no_decay_rule(args.recipe, self.mode))
        self.mix = batch_mixer(args, data.num_classes)
        self.best = 0.0

    def chance(self):
        return {"test_top1": 100 / self.data.num_classes}

    def step(self, net, imgs, labels, progress):  # -> loss, training top-1
        return classification_step(net, imgs, labels, self.mix, self.args.smoothing)

    def evaluate(self, due):  # every epoch: the classifier lives in checkpoint.pt, its top-1 here
        top1 = evaluate_classifier(self.model, self.data, self.args, self.proc)
        self.best = max(self.best, top1)
        return {"test_top1": top1, "best_top1": self.best}

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]


class FrozenEncoder(nn.Module):
    """A probe's base: frozen means frozen, so the encoder never leaves eval mode."""

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()
        return self


class LocationProbe(FrozenEncoder):
    """The paper's location probe (its analysis section) on a frozen encoder.

    Every patch is visible; the position embeddings of a random `pos_mask_ratio` of them are
    replaced by one vector learned with the probe. It starts at zero for every encoder alike (the
    paper does not say which vector it used). Two linear heads read the output features: `head`
    predicts the positions of the patches that lost their embedding (the measure), `control` those
    of the patches that kept it (a check that the probe can read a position that is there). The
    vector's gradient flows through the encoder's activations, but the encoder's weights take none.
    """

    def __init__(self, encoder, pos_mask_ratio):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        N = encoder.num_patches
        self.n_drop = N - int(N * (1 - pos_mask_ratio))
        self.mask_vector = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        self.head, self.control = nn.Linear(encoder.dim, N), nn.Linear(encoder.dim, N)

    def forward(self, imgs):  # (B, C, H, W) -> logits of head and control (B, N, N), dropped (B, N)
        enc, B = self.encoder, len(imgs)
        N = enc.num_patches
        ids = droppos.random_masking(B, N, self.n_drop, device=imgs.device)
        dropped = torch.zeros(B, N, dtype=torch.bool, device=imgs.device).scatter(1, ids, True)
        pos = torch.where(dropped[..., None], self.mask_vector, enc.pos_embed[:, 1:])  # (B, N, D)
        feats = enc.encode(enc.patch_embed(patchify(imgs, enc.patch_size)) + pos)[:, 1:]
        return self.head(feats), self.control(feats), dropped


class LinearProbe(FrozenEncoder):
    """MAE's linear probe on a frozen encoder: BatchNorm without affine parameters, then a linear
    classifier, on the mean of the patch tokens after the final norm (the k-NN monitor's feature).
    The encoder runs without gradient."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.bn = nn.BatchNorm1d(encoder.dim, affine=False, eps=1e-6)
        self.head = nn.Linear(encoder.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # MAE's linear-probe initialisation
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs):  # (B, C, H, W) -> (B, classes)
        with torch.no_grad():
            feats = self.encoder.forward_features(imgs)[:, 1:].mean(1)
        return self.head(self.bn(feats.float()))


class Probing(Task):
    """A probe on a frozen encoder (a checkpoint's, or random weights): the two probes differ in
    their model, step and evaluation only."""

    betas = (0.9, 0.999)

    def __init__(self, args, data, proc):
        super().__init__(args, data, proc)
        encoder = build_encoder(args)
        self.model = self.probe(encoder, args, data).to(proc.device)
        self.groups = param_groups(self.model, args.weight_decay)


class LocationProbing(Probing):
    name, mode, acc_name, acc_key = "location probe", "location_probe", "train top-1", "train_top1"

    def probe(self, encoder, args, data):
        return LocationProbe(encoder, args.pos_mask_ratio)

    def step(self, net, imgs, labels, progress):  # -> loss, top-1 over the dropped positions
        head, control, dropped = net(imgs)
        # raster order
        truth = torch.arange(head.shape[1], device=imgs.device).expand(len(imgs), -1)
        loss = F.cross_entropy(head[dropped].float(), truth[dropped])
        if (~dropped).any():
            loss = loss + F.cross_entropy(control[~dropped].float(), truth[~dropped])
        return loss, (head.argmax(-1) == truth)[dropped].float().mean()

    def evaluate(self, due):  # every epoch, on the held-out images, with masks seeded alike
        return probe_positions(self.model, self.data, self.args, self.proc)

    def chance(self):
        return chance_of_grid(self.model.encoder.grid, "probe")


class LinearProbing(Probing):
    name, mode, acc_name, acc_key = "linear probe", "linear_probe", "train top-1", "train_top1"

    def probe(self, encoder, args, data):
        return LinearProbe(encoder, data.num_classes)

    def step(self, net, imgs, labels, progress):  # -> loss, training top-1
        logits = net(imgs)
        return F.cross_entropy(logits.float(), labels), (logits.argmax(-1) == labels).float().mean()

    def evaluate(self, due):
        return {"test_top1": evaluate_classifier(self.model, self.data, self.args, self.proc)}

    def chance(self):
        return {"test_top1": 100 / self.data.num_classes}

TASKS = {"pretrain": Pretraining, "finetune": Finetuning, "location_probe": LocationProbing,
         "linear_probe": LinearProbing}


def model_config(args):
    """DropPos constructor arguments: the preset, then any size overrides."""
    cfg = dict(PRESETS[args.model])
    for key in cfg:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return dict(cfg, img_size=args.img_size, patch_size=args.patch_size, mask_ratio=args.mask_ratio,
                pos_mask_ratio=args.pos_mask_ratio, pos_embed=args.pos_embed,
                attentive=not args.no_attentive, tau=args.tau)


def build_droppos(cfg):
    try:
        return DropPos(**cfg)
    except ValueError as e:
        raise UserError(str(e)) from None


def build_encoder(args, drop_path=0.0):
    """The ViT of args' shape, with the weights of the mode's checkpoint unless it has none or a
    resumed run's checkpoint brings them."""
    cfg = model_config(args)
    try:
        encoder = ViT(cfg["img_size"], cfg["patch_size"], 3, cfg["dim"], cfg["depth"], cfg["heads"],
                      cfg["pos_embed"], drop_path=drop_path)
    except ValueError as e:
        raise UserError(str(e)) from None
    if source_of(args) and not args.resume:
        load_encoder(encoder, args)
    return encoder


class Classifier(nn.Module):
    """The ViT with a fine-tuning head: average of the patch tokens, LayerNorm, linear.

    mae_head (--recipe paper) pools the last block's tokens without the encoder's final norm, as
    MAE's global-pool head (models_vit.py) does, which deletes that norm. Ours stays so that the
    pre-trained state dict loads; it is frozen instead: unused, it would get no gradient (which
    DistributedDataParallel refuses), and frozen it stays out of the optimiser's groups.
    """

    def __init__(self, encoder, num_classes, mae_head=False):
        super().__init__()
        self.encoder, self.mae_head = encoder, mae_head
        self.fc_norm = nn.LayerNorm(encoder.dim, eps=1e-6)
        self.head = nn.Linear(encoder.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: a near-zero head keeps early steps stable
        nn.init.zeros_(self.head.bias)
        if mae_head:
            encoder.norm.requires_grad_(False)

    def forward(self, imgs):  # (B, C, H, W) -> (B, classes)
        tokens = self.encoder.forward_features(imgs, final_norm=not self.mae_head)
        return self.head(self.fc_norm(tokens[:, 1:].mean(1)))


def build_classifier(args, num_classes):
    """The encoder the checkpoint holds (its shape is in args by now, see `take_encoder_shape`),
    its weights loaded, under a fresh head. On --resume the weights come from the fine-tuning
    checkpoint instead."""
    return Classifier(build_encoder(args, args.drop_path), num_classes,
                      mae_head=args.recipe == "paper")


def batch_mixer(args, num_classes):
    """MixUp / CutMix (torchvision v2), one of them per batch; None when both are off."""
    mixers = []
    if args.mixup > 0:
        mixers.append(v2.MixUp(alpha=args.mixup, num_classes=num_classes))
    if args.cutmix > 0:
        mixers.append(v2.CutMix(alpha=args.cutmix, num_classes=num_classes))
    return v2.RandomChoice(mixers) if mixers else None


def classification_step(net, imgs, labels, mix, smoothing):
    """Cross-entropy with label smoothing on (optionally MixUp/CutMix-mixed) images; mixed
    targets are probabilities, which F.cross_entropy smooths alike.  -> loss, top-1."""
    imgs, target = mix(imgs, labels) if mix is not None else (imgs, labels)
    logits = net(imgs)
    loss = F.cross_entropy(logits.float(), target, label_smoothing=smoothing)
    return loss, (logits.argmax(-1) == labels).float().mean()


# ============================================================================================
# 3. Optimiser and schedule
# ============================================================================================


def laptop_no_decay(name, p):
    """laptop: no weight decay on biases, norms, tokens ([CLS], [MASK]) and position embeddings."""
    return p.ndim <= 1 or name.endswith(("token", "pos_embed"))


def paper_pretrain_no_decay(name, p):
    """paper pre-training: timm's add_weight_decay without a skip list (official main_pretrain.py):
    only 1-D parameters and biases, so the (1, 1, D) cls_token and mask_pos_token are decayed."""
    return p.ndim <= 1 or name.endswith(".bias")


def paper_finetune_no_decay(name, p):
    """paper fine-tuning: MAE's param_groups_lrd: 1-D parameters and the ViT's no_weight_decay()
    names, pos_embed and cls_token (under 'encoder.' in a Classifier)."""
    return p.ndim <= 1 or name.removeprefix("encoder.") in ("pos_embed", "cls_token")


def no_decay_rule(recipe, mode):
    """The rule (name, param) -> True for the parameters AdamW leaves undecayed."""
    if recipe == "laptop":
        return laptop_no_decay
    return paper_pretrain_no_decay if mode == "pretrain" else paper_finetune_no_decay


def param_groups(model, weight_decay, lr_scale=None, no_decay=laptop_no_decay):
    """AdamW groups: no weight decay where no_decay(name, param) says so (`no_decay_rule`), and,
    for fine-tuning, an lr scale per parameter (layer-wise decay). Frozen parameters are left out."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = bool(no_decay(name, p))
        scale = lr_scale(name) if lr_scale else 1.0
        groups.setdefault((skip, scale), {"params": [], "weight_decay": 0.0 if skip else weight_decay,
                                          "lr_scale": scale})["params"].append(p)
    return list(groups.values())


def make_optimizer(groups, betas, device, lr=1e-4):  # the loop sets each step's lr
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))


def optimizer_step(model, optimizer, loss, clip_grad, per_parameter=False):
    """Backward, clip the gradient norm (0 = no clipping), update. The norm is all gradients'
    together or, per_parameter (`per_parameter_clip`), each gradient's own."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        (clip_each_gradient if per_parameter else nn.utils.clip_grad_norm_)(model.parameters(), clip_grad)
    optimizer.step()


def per_parameter_clip(recipe, mode):
    """Whether clipping bounds each gradient on its own: only the official DropPos pre-training
    does (util/utils.py clip_gradients). MAE's fine-tuning, when asked to clip, clips the joint norm."""
    return recipe == "paper" and mode == "pretrain"


def clip_each_gradient(params, max_norm):
    """g *= min(1, max_norm / (‖g‖ + 1e-6)) for each gradient on its own, as the official
    clip_gradients: a large gradient in one layer no longer shrinks every other layer's update, as
    one joint norm would. Nothing is read back to the host."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        norms = torch.stack([g.detach().norm(2) for g in grads])
        for g, scale in zip(grads, (max_norm / (norms + 1e-6)).clamp(max=1.0)):
            g.mul_(scale)


def lr_at(step, total, warmup, base_lr, min_lr):
    """Linear warm-up, then half-cosine to min_lr, per optimiser step."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def layer_id(name, depth):
    """Depth of a fine-tuning parameter for layer-wise lr decay: embeddings 0, block i → i+1."""
    if name.startswith("encoder.") and name.split(".")[1] in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


# ============================================================================================
# 4. Data: the path CIFAR takes
# ============================================================================================


class Data:
    """The training stream (None for --evaluate, which trains nothing), the held-out images (None
    where there are none), the class count."""

    def __init__(self, args, proc):
        self.train, self.held_out, self.num_classes = load_datasets(args)
        training = mode_of(args) != "evaluate"
        if training and len(self.train) < args.batch_size * proc.world:
            raise UserError(f"the training set has {len(self.train)} images, fewer than one batch "
                            f"({args.batch_size} × {proc.world} processes); lower --batch-size")
        self.args = args
        self.per_class = self.class_counts()
        if proc.rank == 0:
            self.warn_about_classes()
        self.stream = (TrainStream(self.train, args, proc.rank, proc.world, mode_of(args), proc.device)
                       if training else None)

    def class_counts(self):
        """Training images per class, for every class the run has (0 for a class with none)."""
        targets = targets_of(self.train.dataset)
        counts = [0] * self.num_classes
        for i in self.train.indices:
            counts[targets[i]] += 1
        return counts

    def warn_about_classes(self):
        """Set-ups that train without complaint but are almost certainly not what was meant."""
        names = getattr(self.train.dataset,
                        "classes", None) or [str(c) for c in range(self.num_classes)]
        if self.num_classes == 1:
            warn("the data has one class: k-NN and fine-tuning top-1 are 100 % whatever is learned")
        empty = [names[c] for c, n in enumerate(self.per_class) if n == 0]
        if empty:
            warn(f"{len(empty)} class(es) have no training image (e.g. {empty[0]!r}): the held-out "
                 f"images of such a class cannot be classified right")
        splits = sorted({n.lower() for n in names} & {"train", "training", "test", "val", "valid",
                                                     "validation"})
        if splits:
            warn(f"the class folders of --data-dir are named like splits ({', '.join(splits)}): "
                 f"--data-dir should be the training split itself, e.g. --data-dir "
                 f"{Path(self.args.data_dir) / splits[-1]}")

    def describe(self):
        """The start-up line's account of the data."""
        a, (h, w) = self.args, droppos.grid_size(self.args.img_size, self.args.patch_size)
        return (f"{len(self.stream.data)} images in {self.num_classes} classes "
                f"({min(self.per_class)}-{max(self.per_class)} per class), {a.img_size} px, "
                f"patch {a.patch_size}, grid {h}x{w}")

    def picture_images(self):
        """8 held-out images for reassembly.png, spread over the set: folders list their images
        class by class, so the first 8 would often be of one class. Unreadable ones are left out."""
        if self.held_out is None:
            return None
        tf, imgs = eval_transform(self.args.img_size, eval_crop_pct(self.args)), []
        for i in range(0, len(self.held_out), max(len(self.held_out) // 8, 1)):
            img = self.held_out[i][0]
            if isinstance(img, str):
                warn_unreadable([img])
            else:
                imgs.append(tf(img))
            if len(imgs) == 8:
                break
        return torch.stack(imgs) if imgs else None


def load_datasets(args):
    """(train, held_out, num_classes), untransformed, cut to --classes / --per-class."""
    if args.dataset == "synthetic":
        train = SyntheticImages(args.synthetic_size, args.img_size, args.seed)
        held_out = SyntheticImages(max(args.synthetic_size // 5, 10), args.img_size, args.seed + 1)
    elif args.dataset in ("cifar10", "cifar100"):
        train, held_out = load_cifar(args)
    else:
        train, held_out = load_imagefolder(args)
    num_classes = len(set(targets_of(train)))
    if args.classes:
        num_classes = min(num_classes, args.classes)
    keep = take_classes(targets_of(train), args.classes, args.per_class)
    if held_out is None:  # a deterministic hold-out: every 10th kept image
        held_out, keep = Subset(train, keep[::10]), [i for j, i in enumerate(keep) if j % 10]
    else:
        held_out = Subset(held_out, take_classes(targets_of(held_out), args.classes, None))
    if len(held_out) == 0:
        raise UserError("the held-out set has no images of the kept classes (--val-dir, --classes)")
    return Subset(train, keep), held_out, num_classes


def targets_of(ds):
    return ds.targets if hasattr(ds, "targets") else [c for _, c in ds.samples]


def take_classes(targets, classes, per_class):
    """Indices of the images of the first `classes` classes, at most `per_class` each, in order."""
    keep, seen = [], {}
    for i, c in enumerate(targets):
        if (classes is None or c < classes) and seen.get(c, 0) < (per_class or INF):
            seen[c] = seen.get(c, 0) + 1
            keep.append(i)
    return keep


def load_cifar(args):
    """CIFAR-10/100 from --data-dir, downloaded there if absent. A failed download leaves nothing
    behind; an archive already there that fails its checksum is named as such."""
    cls = torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100
    root, archive = Path(args.data_dir), Path(args.data_dir) / cls.filename
    if archive.exists() and not torchvision.datasets.utils.check_integrity(str(archive),
                                                                           cls.tgz_md5):
        raise UserError(f"{str(archive)!r} is corrupt or incomplete (its "
                        f"MD5 checksum does not match); "
                        f"delete it and run again to download it, or put a good copy there")
    before = set(root.rglob("*")) if root.exists() else None
    try:
        return cls(args.data_dir, train=True, download=True), cls(args.data_dir, train=False, download=True)
    except Exception as e:  # network, disk or archive: all end the same way for the user
        if before is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for p in sorted(set(root.rglob("*")) - before, reverse=True):  # files before folders
                p.rmdir() if p.is_dir() else p.unlink()
        why = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"could not get {args.dataset} into {args.data_dir!r} ({type(e).__name__}: {why}). "
                        f"Download {cls.filename} from https://www.cs.toronto.edu/~kriz/cifar.html "
                        f"and put it in {args.data_dir!r} (or pass --data-dir), or "
                        f"use --dataset synthetic, which "
                        f"works offline") from None


class TrainStream:
    """This process's training batches for an epoch: augmented, normalised, on the device.

    CIFAR-size sets are decoded once into memory and each batch is augmented in one resampling
    call on the device (~1 ms of PIL work per image saved); photos are cropped one by one from
    their full resolution by `SeededTransform`. Both seed the augmentation by (seed, epoch, batch
    or image), so a resumed run sees exactly the crops of an uninterrupted one. Unreadable images
    are left out with a warning that names them, and counted.
    """

    def __init__(self, train_set, args, rank, world, mode, device):
        self.size, self.seed, self.rank, self.device = args.img_size, args.seed, rank, device
        finetune = mode != "pretrain"  # probes augment as fine-tuning does (MAE's linear probe)
        self.scale = crop_scale(finetune)
        # augment_batch can crop and flip but not RandAugment or RandomErasing, so MAE's fine-tuning
        # augmentation (--recipe paper) takes the per-image path even for CIFAR-size sets. Exact resume
        # holds there too: SeededTransform seeds each image by (seed, epoch, index).
        mae_augment = mode == "finetune" and args.recipe == "paper"
        stored = None if mae_augment else decode_in_memory(train_set, args.img_size)
        self.in_memory = stored is not None
        if self.in_memory:
            images, labels, self.bad_at_start = stored
            self.data = torch.utils.data.TensorDataset(images, labels)
            collate = None
        else:
            self.bad_at_start = []
            self.data = SeededTransform(train_set, train_transform(args.img_size, finetune, mae_augment), args.seed)
            collate = collate_readable
        self.skipped = 0  # unreadable images met this epoch by this process
        # Indexing a tensor needs no loader processes: they would only compete for the cores. The
        # generator keeps the loader from drawing its seed from the global RNG (exact resume).
        self.loader = DataLoader(self.data, args.batch_size, sampler=SkipSampler(self.data, rank, world, args.seed),
                                 num_workers=0 if self.in_memory else args.workers, drop_last=True,
                                 collate_fn=collate, generator=torch.Generator().manual_seed(args.seed))
        self.steps = len(self.loader)  # per epoch

    def epoch(self, epoch, start_step=0):
        """Yields (step, (images, labels)) on the device for the steps of `epoch` from start_step on."""
        self.loader.sampler.set_epoch(epoch, skip=start_step * self.loader.batch_size)
        self.skipped = 0
        if not self.in_memory:
            self.data.epoch = epoch
        for step, batch in enumerate(self.loader, start_step):
            if self.in_memory:
                imgs, labels = batch
                g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, step, self.rank))
                imgs = augment_batch(imgs.to(self.device, non_blocking=True), self.size, self.scale, g)
            else:
                imgs, labels, bad = batch
                warn_unreadable(bad)
                self.skipped += len(bad)
                if imgs is None:
                    raise UserError(f"every image of a batch was unreadable, e.g. {bad[0]}")
                imgs = imgs.to(self.device, non_blocking=True)
            yield step, (imgs, labels.to(self.device, non_blocking=True))

    def left_out(self, proc):
        """Unreadable training images left out of the epoch that just ended, over all processes."""
        n = self.skipped + (len(self.bad_at_start) if proc.rank == 0 else 0)
        if proc.world > 1:
            t = torch.tensor([float(n)], device=proc.device)
            dist.all_reduce(t)
            n = int(t.item())
        return n


def decode_in_memory(dataset, size, limit_bytes=2 ** 31):
    """A CIFAR-size training set as one uint8 tensor (M, 3, size, size), its labels (M,) and the
    paths of the images that could not be read (left out, and named in a warning).

    None when the images are larger than 64 px, not already size×size, or would fill more than
    2 GiB: such photos are cropped one by one from their full resolution instead.
    """
    if size > 64 or len(dataset) * 3 * size * size > limit_bytes:
        return None
    base, idx = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset, range(len(dataset)))
    if isinstance(base, torchvision.datasets.CIFAR10):  # CIFAR-100 too: it subclasses CIFAR-10
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        return (torch.from_numpy(base.data).permute(0, 3, 1, 2)[idx].contiguous(),
                torch.tensor(base.targets)[idx], [])
    images = torch.empty(len(dataset), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(dataset), dtype=torch.long)
    n, bad = 0, []
    for i in range(len(dataset)):
        img, label = dataset[i]
        if isinstance(img, str):
            bad.append(img)
            continue
        if img.size != (size, size):
            return None
        images[n], labels[n] = v2.functional.pil_to_tensor(img), label
        n += 1
    warn_unreadable(bad)
    return images[:n], labels[:n], bad


class SkipSampler(torch.utils.data.Sampler):
    """A distributed, seeded shuffle per epoch that can start part-way through (mid-epoch resume)."""

    def __init__(self, dataset, rank, world, seed):
        self.inner = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return iter(list(self.inner)[self.skip:])

    def __len__(self):
        return len(self.inner) - self.skip


def mix_seed(*parts):
    """One 63-bit seed from several integers, different for different tuples in practice."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + p) % 2 ** 63
    return h


def crop_scale(finetune):
    # Paper: RandomResizedCrop(scale 0.2-1) + flip for pre-training; MAE fine-tuning crops from 0.08.
    return (0.08 if finetune else 0.2, 1.0)


def augment_batch(imgs, size, scale, generator):
    """`train_transform` for a whole uint8 batch (B, 3, S, S) on its device: RandomResizedCrop,
    horizontal flip, normalisation.  -> (B, 3, size, size) float."""
    B, _, H, W = imgs.shape
    boxes = random_crop_boxes(B, H, W, scale, generator)
    flip = torch.rand(B, generator=generator) < 0.5
    # Bicubic overshoots; clamping matches what resampling 8-bit images gives.
    return normalize(resample_crops(imgs.float() / 255, boxes, flip, size).clamp(0, 1))


def random_crop_boxes(n, height, width, scale, generator, ratio=(3 / 4, 4 / 3), tries=10):
    """RandomResizedCrop's boxes for n images at once.  -> (n, 4) float: top, left, height, width.

    As torchvision draws them: area share uniform in `scale`, aspect ratio log-uniform in `ratio`,
    the first of `tries` draws that fits inside the image, else the whole image (torchvision's
    fallback for a square image), and a uniformly placed top-left corner.
    """
    area = torch.empty(n, tries).uniform_(*scale, generator=generator) * height * width
    aspect = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first draw that fits
    any_fit = fits.any(1)
    h = torch.where(any_fit, h.gather(1, first)[:, 0], float(height))
    w = torch.where(any_fit, w.gather(1, first)[:, 0], float(width))
    top = (torch.rand(n, generator=generator) * (height - h + 1)).floor()
    left = (torch.rand(n, generator=generator) * (width - w + 1)).floor()
    return torch.stack([top, left, h, w], dim=1)


def resample_crops(imgs, boxes, flip, size):
    """Every image's box resized to size×size (bicubic) in one grid_sample call, mirrored where
    flip.  imgs: (B, C, H, W) float; boxes: (B, 4) as `random_crop_boxes`; flip: (B,) bool."""
    B, C, H, W = imgs.shape
    top, left, h, w = boxes.unbind(1)
    # affine_grid maps output coordinates in [-1, 1] (pixel edges, align_corners=False) to input
    # coordinates: the output's edges land on the box's edges.
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -w / W, w / W)
    theta[:, 0, 2] = (2 * left + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta.to(imgs.device), [B, C, size, size], align_corners=False)
    return F.grid_sample(imgs, grid, mode="bicubic", padding_mode="border", align_corners=False)


def _mean_std(device):
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(STD, device=device).view(1, 3, 1, 1))


def normalize(imgs):
    """(B, 3, H, W) in [0, 1] -> ImageNet-normalised, as the per-image transforms do."""
    mean, std = _mean_std(imgs.device)
    return (imgs - mean) / std


def denormalize(imgs):
    """Inverse of `normalize`, clamped to [0, 1] for display."""
    mean, std = _mean_std(imgs.device)
    return (imgs * std + mean).clamp(0, 1)


# ============================================================================================
# 5. Evaluation: k-NN, top-1, position scores
# ============================================================================================


def held_out_batches(data, args, proc, batch_size):
    """This process's share of the held-out images, unaugmented, as (images, labels) on the device."""
    ds = SeededTransform(data.held_out, eval_transform(args.img_size, eval_crop_pct(args)), 0)
    return readable_batches(Subset(ds, range(proc.rank, len(ds), proc.world)), batch_size, args, proc)


def readable_batches(ds, batch_size, args, proc):
    for imgs, labels, bad in DataLoader(ds, batch_size, num_workers=args.workers, collate_fn=collate_readable):
        warn_unreadable(bad)
        if imgs is not None:
            yield imgs.to(proc.device, non_blocking=True), labels.to(proc.device, non_blocking=True)


@torch.no_grad()
def extract_features(encoder, batches, proc):
    """L2-normalised average of the encoder's patch tokens per image, from every process.  -> (M, D), (M,)."""
    feats = [torch.zeros(0, encoder.dim, device=proc.device)]  # so that a process with no images still gathers
    labels = [torch.zeros(0, dtype=torch.long, device=proc.device)]
    for imgs, y in batches:
        with autocast(proc):
            f = encoder.forward_features(imgs)[:, 1:].mean(1)
        feats.append(F.normalize(f.float(), dim=-1))
        labels.append(y)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if proc.world == 1:
        return feats, labels
    # Shares differ by a few images: pad to the longest, gather, cut the padding off again.
    n = torch.tensor([len(feats)], device=proc.device)
    sizes = [torch.zeros_like(n) for _ in range(proc.world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    pad = lambda t: torch.cat([t, t.new_zeros(longest - len(t), *t.shape[1:])])
    all_f = [torch.zeros(longest, encoder.dim, device=proc.device) for _ in sizes]
    all_y = [torch.zeros(longest, dtype=torch.long, device=proc.device) for _ in sizes]
    dist.all_gather(all_f, pad(feats))
    dist.all_gather(all_y, pad(labels))
    keep = [slice(0, int(s.item())) for s in sizes]
    return torch.cat([f[k] for f, k in zip(all_f, keep)]), torch.cat([y[k] for y, k in zip(all_y, keep)])


def knn_classify(train_feats, train_labels, test_feats, num_classes, k=20, t=0.07, chunk=512):
    """Weighted k-NN vote (DINO): each of the k most cosine-similar training features votes for
    its label with weight exp(sim / t).  Features must be L2-normalised.  -> (M_test,) labels."""
    preds = []
    for q in test_feats.split(chunk):
        sim, idx = (q @ train_feats.T).topk(min(k, train_feats.shape[0]), dim=1)  # (m, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def run_knn(encoder, data, args, proc):
    """k-NN top-1 (%) of the encoder's features on the held-out images, the training images as
    the bank. Every process embeds its share of both, so none waits idle in a collective."""
    encoder.eval()
    train_ds = SeededTransform(data.train, eval_transform(args.img_size, eval_crop_pct(args)), 0)
    shard = Subset(train_ds, range(proc.rank, len(train_ds), proc.world))
    bank_f, bank_y = extract_features(encoder, readable_batches(shard, 256, args, proc), proc)
    test_f, test_y = extract_features(encoder, held_out_batches(data, args, proc, 256), proc)
    encoder.train()
    pred = knn_classify(bank_f, bank_y, test_f, data.num_classes, args.knn_k, args.knn_t)
    return 100.0 * (pred == test_y).float().mean().item()


@torch.no_grad()
def evaluate_classifier(model, data, args, proc):
    """Top-1 (%) on the held-out images, split across processes."""
    model.eval()
    counts = torch.zeros(2, device=proc.device)  # right, seen
    for imgs, y in held_out_batches(data, args, proc, args.batch_size):
        with autocast(proc):
            logits = model(imgs)
        counts[0] += (logits.argmax(-1) == y).sum()
        counts[1] += len(y)
    if proc.world > 1:
        dist.all_reduce(counts)
    model.train()
    return 100.0 * (counts[0] / counts[1].clamp(min=1)).item()


def head_positions(model, data, args, proc):
    """The DropPos position head on the held-out images, without the loss or its attentive pass:
    the scores of the patches whose position was dropped (test_pos_*) and what the picture draws."""
    def predict(imgs):
        tokens, ids_keep, dropped = model.embed_visible(imgs)
        return {"test_pos": (model.decoder(model.encoder.encode(tokens)), ids_keep, dropped)}
    return held_out_positions(predict, data, args, proc, model.grid)


def probe_positions(probe, data, args, proc):
    """The location probe on the held-out images: its measure and its control."""
    def predict(imgs):
        head, control, dropped = probe(imgs)
        truth = torch.arange(head.shape[1], device=imgs.device).expand(len(imgs), -1)
        return {"probe": (head, truth, dropped), "control": (control, truth, ~dropped)}
    return held_out_positions(predict, data, args, proc, probe.encoder.grid, keep=0)[0]


@torch.no_grad()
def held_out_positions(predict, data, args, proc, grid, keep=20_000):
    """Position scores over the held-out images (every process its share), for each group that
    predict(imgs) -> {name: (logits (B, n, N), true cells (B, n), scored (B, n) bool)} returns.
    Masks are seeded by --seed, so every epoch scores the same patches, and the training RNG is
    left as it was (exact resume).  -> ({name_top1 %, name_within1 %, name_distance cells},
    {name: (probs (M, N), true cells (M,))} of up to `keep` patches of this process, for
    pictures)."""
    sums, kept = {}, {}
    with torch.random.fork_rng([proc.device] if proc.device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        for imgs, _ in held_out_batches(data, args, proc, 256):
            with autocast(proc):
                groups = predict(imgs)
            for name, (logits, true, scored) in groups.items():
                probs, true = logits[scored].float().softmax(-1), true[scored]
                s, n = position_scores(probs, true, grid), len(true)
                sums[name] = sums.get(name, 0) + torch.tensor([s["top1"], s["within1"],
                                                               s["distance"], 1.0]) * n
                p, t = kept.setdefault(name, ([], []))
                if sum(map(len, t)) < keep:
                    p.append(probs.cpu()), t.append(true.cpu())
    results = {}
    for name, s in sorted(sums.items()):
        if proc.world > 1:
            s = s.to(proc.device)
            dist.all_reduce(s)
        top1, within1, distance = (s[:3] / s[3].clamp(min=1)).tolist()
        results.update({f"{name}_top1": 100 * top1, f"{name}_within1": 100 * within1,
                        f"{name}_distance": distance})
    return results, {k: (torch.cat(p)[:keep], torch.cat(t)[:keep]) for k, (p, t) in kept.items() if p}


def position_scores(probs, true_pos, grid):
    """probs: (M, N), only the argmax counts; true_pos: (M,) long, same device; grid: (h, w).
    Floats: top1, within1 (Chebyshev distance <= 1) as fractions, distance as mean Euclidean
    cells; chance_*: the same over every (true cell, guess) pair, i.e. a uniform guess."""
    h, w = grid
    k = torch.arange(h * w, device=probs.device)
    xy = torch.stack([k // w, k % w], 1).double()  # (N, 2); float64 so the chances are exact
    s = {}
    for pre, d in (("", xy[probs.argmax(1)] - xy[true_pos]), ("chance_", xy[:, None] - xy[None])):
        d = d.view(-1, 2)  # (M or N*N, 2) row and column offsets of the guess from the truth
        s |= {pre + "top1": (d == 0).all(1).double().mean().item(),
              pre + "within1": (d.abs().amax(1) <= 1).double().mean().item(),
              pre + "distance": d.norm(dim=1).mean().item()}
    return s


def chance_of_grid(grid, name):
    """What a uniform guess over the grid scores, under held_out_positions' names."""
    s = position_scores(torch.zeros(1, grid[0] * grid[1]), torch.zeros(1, dtype=torch.long), grid)
    return {f"{name}_top1": 100 * s["chance_top1"], f"{name}_within1": 100 * s["chance_within1"],
            f"{name}_distance": s["chance_distance"]}


##############################################################################################
# Part II: what keeps runs safe, and the tools around the loop
##############################################################################################


# ============================================================================================
# 6. The command line
# ============================================================================================


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default, where it has one, and the default --recipe paper gives it."""

    def _get_help_string(self, action):
        paper = paper_default_text(action.dest)
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)):  # `is`: 0 == False
            return f"{action.help} (default: %(default)s{paper})"
        if paper and action.help.endswith(")"):  # a default written into the help: "(default: ...)"
            return f"{action.help[:-1]}{paper})"
        return action.help + (f" ({paper[2:]})" if paper else "")


def paper_default_text(dest):
    """'; --recipe paper: X' for --help, per mode where the modes differ; '' for other flags."""
    values = {mode: RECIPES["paper"][mode][dest] for mode in ("pretrain", "finetune") if dest in RECIPES["paper"][mode]}
    if not values:
        return ""
    if len(set(values.values())) == 1:
        return f"; --recipe paper: {next(iter(values.values()))}"
    return f"; --recipe paper: {values['pretrain']} pre-training, {values['finetune']} fine-tuning"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # a typo is bad input like any other: one line, exit code 2
        raise UserError(f"{message} (see --help)")


def build_parser():
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=list(DATASETS),
                   help="what to train on; synthetic needs no download")
    g.add_argument("--data-dir", default="data", help="where CIFAR is downloaded to; for imagefolder, "
                   "the ImageFolder tree (one sub-folder per class) of training images")
    g.add_argument("--val-dir", help="imagefolder: a held-out ImageFolder tree for k-NN and fine-tuning "
                   "top-1 (default: every 10th training image is held out)")
    g.add_argument("--classes", type=int, help="keep only the first K classes (default: all)")
    g.add_argument("--per-class", type=int, help="keep at most M training images per class (default: all)")
    g.add_argument("--synthetic-size", type=int, default=2048, help="synthetic: number of training images")
    g.add_argument("--workers", type=int, help="loader processes for photos (default: 0 on a CPU, where "
                   "they would compete with the training step for the cores; 8 on a GPU). CIFAR-size "
                   "sets are held in memory and use none")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="encoder and decoder preset")
    g.add_argument("--img-size", type=int, help="training resolution (default: 32 for CIFAR and "
                   "synthetic, 224 for imagefolder)")
    g.add_argument("--patch-size", type=int, help="patch size (default: 4 at 32 px, else 16)")
    for name, what in [("dim", "encoder width"), ("depth", "encoder blocks"), ("heads", "encoder heads"),
                       ("decoder-dim", "decoder width"), ("decoder-depth", "decoder blocks"),
                       ("decoder-heads", "decoder heads")]:
        g.add_argument(f"--{name}", type=int, help=f"{what} (default: the preset's)")

    g = p.add_argument_group("method (paper section 3; each ablation is one flag)")
    g.add_argument("--mask-ratio", type=float, default=0.75, help="γ: share of patches hidden")
    g.add_argument("--pos-mask-ratio", type=float, default=0.75,
                   help="γ_pos: share of visible patches whose position embedding is dropped")
    g.add_argument("--sigma", type=float, default=1.0, help="σ0 of position smoothing (0 = one-hot targets)")
    g.add_argument("--no-sigma-decay", action="store_true", help="keep σ = σ0 instead of decaying it to 0")
    g.add_argument("--no-attentive", action="store_true", help="uniform loss weights instead of attentive ones")
    g.add_argument("--tau", type=float, default=0.1, help="τ: temperature of attentive reconstruction")
    g.add_argument("--pos-embed", default="sincos", choices=["sincos", "learnable"],
                   help="fixed 2-D sin-cos position embedding, or a learned one")

    g = p.add_argument_group("optimisation")
    g.add_argument("--recipe", default="laptop", choices=sorted(RECIPES),
                   help="laptop: defaults for small runs on a CPU budget. paper: the official DropPos "
                   "pre-training (its defaults below, the ViT-B decoder at any size, each gradient clipped "
                   "on its own, [CLS] and [MASK] tokens decayed) and MAE's fine-tuning as DropPos runs it "
                   "(RandAugment and RandomErasing, a head that pools without the encoder's final norm, 224/256 "
                   "evaluation crop). Flags you type win over either")
    g.add_argument("--epochs", type=int, default=100, help="length of the run")
    g.add_argument("--batch-size", type=int, default=64, help="images per step and process")
    g.add_argument("--blr", type=float, help="base lr; lr = blr × total batch / 256 (default: 2e-3 "
                   "for pre-training, 1e-3 for fine-tuning, 1e-2 for the probes)")
    g.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the cosine")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear lr warm-up")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--clip-grad", type=float, default=5.0, help="gradient-norm clipping (0 = none); "
                   "--recipe paper pre-training clips each parameter's gradient to this norm on its own")
    g.add_argument("--seed", type=int, default=0, help="seeds data order, augmentation, masking, init")

    g = p.add_argument_group("fine-tuning")
    g.add_argument("--finetune", metavar="CHECKPOINT|scratch", help="train a classifier on the encoder of a "
                   "pre-training run (its checkpoint.pt or encoder.pt), or on a random one ('scratch')")
    g.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the last block")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.8, help="MixUp alpha (0 = off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0 = off)")

    g = p.add_argument_group("evaluation and probes (any checkpoint: "
                             "train.py's, the official DropPos "
                             "code's, MAE's, timm's)")
    g.add_argument("--evaluate", metavar="CHECKPOINT",
                   help="train nothing: position top-1, within one cell and distance on the "
                   "held-out images (with a position head), k-NN, test top-1 (a "
                   "fine-tuning checkpoint), the picture; evaluation.json and one JSON line")
    g.add_argument("--location-probe", metavar="CHECKPOINT|random",
                   help="the paper's location probe: a frozen encoder, every patch visible, the "
                   "position embeddings of --pos-mask-ratio of "
                   "them replaced by one learned vector, linear heads predicting positions")
    g.add_argument("--linear-probe", metavar="CHECKPOINT|random",
                   help="MAE's linear probe: a frozen "
                   "encoder, BatchNorm without affine parameters and a linear classifier")

    g = p.add_argument_group("output and evaluation")
    g.add_argument("--output-dir", help="the run's folder (default: runs/<dataset>-pretrain, "
                   "runs/<dataset>-scratch or runs/<pre-training run>-finetune, then -paper for --recipe "
                   "paper and -seedN for seed N > 0)")
    g.add_argument("--resume", metavar="FOLDER|CHECKPOINT", help="continue the run in FOLDER exactly where it "
                   "stopped, with the flags it was started with")
    g.add_argument("--knn-every", type=int, default=10, help="k-NN monitor every N epochs and at the end (0 = off)")
    g.add_argument("--knn-k", type=int, default=20, help="neighbours of the k-NN monitor")
    g.add_argument("--knn-t", type=float, default=0.07, help="temperature of the k-NN vote")
    g.add_argument("--log-every", type=float, default=5.0, help="seconds between progress lines (0 = every step)")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: a GPU if present")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on a GPU, and on a CPU whose bf16 matmuls beat fp32 ones")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (minutes of start-up)")

    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", action="store_true", help="time training steps and print one JSON line")
    g.add_argument("--bench-steps", type=int, default=10, help="timed steps")
    g.add_argument("--bench-warmup", type=int, default=3, help="untimed steps first")
    return p

# Flags that change nothing a run learns: they may differ on --resume. Every other flag is the run.
FREE_ON_RESUME = {"resume", "output_dir", "data_dir", "val_dir", "workers", "device", "precision", "compile",
                  "log_every", "knn_every", "knn_k", "knn_t"}

# What a command does: the flag that chose it (at most one), else pre-training.
MODES = ("benchmark", "evaluate", "finetune", "location_probe", "linear_probe")

# Flags that apply in some modes only; any other mode refuses them by name.
MODE_ONLY = [({"mask_ratio", "sigma", "no_sigma_decay", "no_attentive", "tau", "knn_every"},
              {"pretrain", "benchmark"}),
             ({"decoder_dim", "decoder_depth", "decoder_heads"},
              {"pretrain", "benchmark", "evaluate"}),
             ({"pos_mask_ratio"}, {"pretrain", "benchmark", "location_probe"}),
             ({"knn_k", "knn_t"}, {"pretrain", "evaluate"}),
             ({"layer_decay", "drop_path", "smoothing", "mixup", "cutmix"}, {"finetune"}),
             ({"bench_steps", "bench_warmup"}, {"benchmark"}),
             ({"epochs", "blr", "min_lr", "warmup_epochs", "weight_decay", "clip_grad", "compile",
               "log_every"}, set(MODES) - {"evaluate"} | {"pretrain"})]  # what training is

ENCODER_SHAPE = ("img_size", "patch_size", "dim", "depth", "heads", "pos_embed")

INF = math.inf

LIMITS = {  # flag: (low, high, low allowed, high allowed); NaN fails every comparison, so it is refused too
    "epochs": (1, INF, True, False), "batch_size": (1, INF, True, False), "synthetic_size": (1, INF, True, False),
    "workers": (0, INF, True, False), "classes": (1, INF, True, False), "per_class": (1, INF, True, False),
    "img_size": (1, INF, True, False), "patch_size": (1, INF, True, False), "dim": (1, INF, True, False),
    "depth": (1, INF, True, False), "heads": (1, INF, True, False), "decoder_dim": (1, INF, True, False),
    "decoder_depth": (1, INF, True, False), "decoder_heads": (1, INF, True, False),
    "sigma": (0, INF, True, False), "blr": (0, INF, False, False), "min_lr": (0, INF, True, False),
    "warmup_epochs": (0, INF, True, False), "weight_decay": (0, INF, True, False),
    "clip_grad": (0, INF, True, False), "layer_decay": (0, 1, False, True), "drop_path": (0, 1, True, False),
    "smoothing": (0, 1, True, False), "mixup": (0, INF, True, False), "cutmix": (0, INF, True, False),
    "knn_every": (0, INF, True, False), "knn_k": (1, INF, True, False), "knn_t": (0, INF, False, False),
    "log_every": (0, INF, True, False), "bench_steps": (1, INF, True, False), "bench_warmup": (0, INF, True, False),
}

# --recipe: the defaults a recipe gives, per mode, to the flags the user did not type (`complete_args`);
# flags missing here keep the parser's default. laptop's are tuned for short CPU runs. paper's
# pre-training ones are the official DropPos code's (main_pretrain.py, scripts/pretrain_base.sh: the
# ViT-B decoder dec512d2b whatever the encoder), its fine-tuning ones DropPos's fine-tuning scripts,
# which run MAE's recipe: no clipping, a floor under the cosine. Entries equal to the parser's
# default are listed too, so each paper column reads as the whole recipe.
RECIPES = {
    "laptop": {"pretrain": dict(blr=2e-3), "finetune": dict(blr=1e-3),
               "probe": dict(blr=1e-2, weight_decay=0.0)},  # a linear head on frozen features
    "paper": {"pretrain": dict(blr=1.5e-4, warmup_epochs=10.0, min_lr=0.0, weight_decay=0.05, clip_grad=5.0,
                               decoder_dim=512, decoder_depth=2, decoder_heads=16),
              "finetune": dict(blr=1e-3, warmup_epochs=5.0, min_lr=1e-6, weight_decay=0.05, clip_grad=0.0,
                               layer_decay=0.75, drop_path=0.1, smoothing=0.1, mixup=0.8,
                               cutmix=1.0),
              "probe": dict(blr=1e-2, weight_decay=0.0)},  # MAE: LARS, batch 16384; AdamW here
}


def parse_args(argv=None):
    """The run's flags: the command line checked and completed or, with --resume, the flags the run
    was started with plus the free ones given now."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    if args.resume:
        args = resumed_args(args, given)
    else:
        check_mode_flags(args, given)
        complete_args(args, given)
    check_ranges(args)
    return args


def given_flags(parser, argv):
    """The destinations of the flags actually typed (parsing again with every default suppressed)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def flag(name):
    return "--" + name.replace("_", "-")


def mode_of(args):
    """'pretrain', or the mode flag given: 'finetune', 'evaluate', 'location_probe', ..."""
    return next((m for m in MODES if getattr(args, m, None)), "pretrain")


def source_of(args):
    """The checkpoint the mode starts from; None for pre-training, scratch and random weights."""
    path = getattr(args, mode_of(args), None)
    return path if isinstance(path, str) and path not in ("scratch", "random") else None


def check_mode_flags(args, given):
    """Refuse flags that cannot apply to what was asked for, rather than ignore them."""
    mode = mode_of(args)
    for other in given & set(MODES) - {mode}:
        raise UserError(f"{flag(other)} does not apply with {flag(mode)}")
    for flags, modes in MODE_ONLY:
        bad = sorted(given & flags) if mode not in modes else []
        if bad and mode == "pretrain":
            raise UserError(f"{flag(bad[0])} applies only with "
                            f"{' or '.join(map(flag, modes - {'pretrain'}))}")
        if bad:
            raise UserError(f"{flag(bad[0])} does not apply with {flag(mode)}")
    if "model" in given and source_of(args):
        raise UserError(f"--model does not apply with {flag(mode)} "
                        f"CHECKPOINT: the encoder's shape comes "
                        f"from the checkpoint")


def complete_args(args, given):
    """Fill the defaults that depend on other flags; a checkpoint to fine-tune decides the encoder."""
    if source_of(args):
        take_encoder_shape(args, given)
    if args.img_size is None:
        args.img_size = DATASETS[args.dataset]
        native = first_image_size(args)
        if native and native != (args.img_size, args.img_size):
            warn(f"the images in --data-dir are {native[0]}x{native[1]} px, but --{args.dataset} "
                 f"trains at {args.img_size} px unless told otherwise: pass "
                 f"--img-size {min(native)} to train "
                 f"at their size")
    check_heads(args, given)
    if args.patch_size is None:
        args.patch_size = 4 if args.img_size == 32 else 16
    for name, value in RECIPES[args.recipe].get(recipe_mode(args), {}).items():
        if name not in given:  # a typed flag wins over the recipe; --benchmark times pre-training
            setattr(args, name, value)
    if args.workers is None:
        args.workers = default_workers(args.device)
    if args.output_dir is None:
        args.output_dir = str(Path("runs") / default_run_name(args))


def first_image_size(args):
    """(width, height) of the first image of an ImageFolder --data-dir; None when there is none."""
    if args.dataset != "imagefolder" or not Path(args.data_dir).is_dir():
        return None
    for folder in sorted(d for d in Path(args.data_dir).iterdir() if d.is_dir()):
        for path in sorted(folder.iterdir()):
            try:
                with Image.open(path) as im:
                    return im.size
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                continue
    return None


def check_heads(args, given):
    """A typed --heads that splits a preset's width differently from that preset is most likely a
    slip: the weights load either way, but the encoder computes something else."""
    dim = args.dim or PRESETS[args.model]["dim"]
    heads = args.heads or PRESETS[args.model]["heads"]
    if dim % heads:
        return  # refused when the model is built: the width must split into equal heads
    preset = next((name for name, p in PRESETS.items() if p["dim"] == dim), None)
    if "heads" in given and preset and PRESETS[preset]["heads"] != heads:
        warn(f"--heads {heads} splits width {dim} into heads of "
             f"{dim // heads}; ViT-{preset.title()} "
             f"(width {dim}) has {PRESETS[preset]['heads']} of {dim // PRESETS[preset]['heads']}")


def default_workers(device):
    return 8 if torch.cuda.is_available() and device != "cpu" else 0


def recipe_mode(args):
    """Which column of RECIPES a mode reads: probes have their own; --benchmark times
    pre-training."""
    mode = mode_of(args)
    return "probe" if mode.endswith("probe") else "pretrain" if mode == "benchmark" else mode


def default_run_name(args):
    """Different runs get different default folders: fine-tuning from scratch, from one
    pre-training run and from another, under another recipe or seed, never share one."""
    mode, source = mode_of(args), source_of(args)
    if mode == "pretrain":
        name = f"{args.dataset}-pretrain"
    elif mode == "finetune" and not source:
        name = f"{args.dataset}-scratch"
    else:  # <run>-finetune, <run>-evaluate, <dataset>-random-location-probe, ...
        origin = Path(source).resolve().parent.name if source else f"{args.dataset}-random"
        name = f"{origin}-{mode.replace('_', '-')}"
    return name + (f"-{args.recipe}" if args.recipe != "laptop" else "") + (f"-seed{args.seed}" if args.seed else "")


def check_ranges(args):
    for name, (lo, hi, lo_ok, hi_ok) in LIMITS.items():
        v = getattr(args, name)
        if v is None:
            continue
        if not ((v >= lo if lo_ok else v > lo) and (v <= hi if hi_ok else v < hi)):
            allowed = (f"{'>=' if lo_ok else '>'} {lo}" if hi == INF else
                       f"in {'[' if lo_ok else '('}{lo}, {hi}{']' if hi_ok else ')'}")
            raise UserError(f"{flag(name)} must be {allowed}, got {v}")


# ============================================================================================
# 7. Checkpoints from anywhere
# ============================================================================================


def load_checkpoint(path):
    """torch.load under weights_only. argparse.Namespace is allowed because MAE's save_model
    pickles its run's args; anything else foreign is refused, so no file runs code here."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        torch.serialization.add_safe_globals([argparse.Namespace])
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"cannot read checkpoint {str(path)!r}: {e.strerror or e}") from None
    except Exception as e:
        # weights_only names the refused class in a multi-line message: keep just that name, as
        # the file is readable, only not safely.
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise UserError(f"checkpoint {str(path)!r} holds a pickled {refused[1]}, which a "
                            f"weights-only load refuses; save plain tensors and dicts") from None
        raise UserError(f"checkpoint {str(path)!r} is corrupt, truncated or not a checkpoint "
                        f"({type(e).__name__})") from None


class Imported(NamedTuple):
    model: dict         # our DropPos key names: encoder.*, maybe mask_pos_token and decoder.*
    source: str         # the layout, for messages
    args: dict | None   # train.py's run flags (its checkpoint.pt only)
    mode: str | None    # "pretrain" / "finetune" (train.py's checkpoint.pt only)
    epoch: int | None   # completed epochs, where the file says
    arch: dict          # what the file's arch name tells (arch_facts), {} without one
    extra: dict         # "ignored" / "missing" key prefixes, and facts from a Namespace

_ENCODER = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")

_DECODER = {"decoder_embed": "decoder.embed", "decoder_blocks": "decoder.blocks",
            "decoder_norm": "decoder.norm", "decoder_pred": "decoder.head"}

_NAMESPACE_FACTS = ("input_size", "mask_ratio", "pos_mask_ratio")  # argument names of main_*.py


def _is_state(x):
    return isinstance(x, dict) and bool(x) and all(torch.is_tensor(v) for v in x.values())


def _describe(obj):
    if isinstance(obj, dict):
        keys = [str(k) for k in obj]
        return f"a dict with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
    return f"a {type(obj).__name__}"


def _rename(state):
    """timm / official DropPos names -> ours.  -> (model, sorted prefixes of keys left out).

    Keys already in our names (train.py's) pass. The official decoder is taken only when its
    decoder_pred is the N-way position head: MAE's (also DropPos --drop_pos_type vanilla_mae)
    predicts p*p*3 pixels there, and 3p^2 is never a square N, so the shape tells them apart."""
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DDP's wrapper
    pos, pred = state.get("pos_embed"), state.get("decoder_pred.weight")  # (1, 1+N, D), (?, Dd)
    positional = pos is not None and pred is not None and pred.shape[0] == pos.shape[1] - 1
    model, ignored = {}, set()
    for key, t in state.items():
        top, _, rest = key.partition(".")
        if top in ("encoder", "decoder", "mask_pos_token"):
            model[key] = t
        elif top in _ENCODER:
            model["encoder." + key] = t
        elif top in _DECODER and positional:
            model[f"{_DECODER[top]}.{rest}"] = t
        else:  # pixel decoder, mask_token, classifier head, fc_norm, ...
            ignored.add(top)
    if "encoder.norm.weight" not in model and "fc_norm.weight" in state:
        # MAE's global-pool classifiers drop the encoder's final norm for one after pooling
        # (fc_norm); as the encoder's norm it normalises every token instead of their mean.
        model.update({f"encoder.norm.{k}": state[f"fc_norm.{k}"] for k in ("weight", "bias")})
        ignored.discard("fc_norm")
    return model, sorted(ignored)


def import_state(obj, path):
    """What `read` returned -> Imported; UserError for a layout this cannot place."""
    args = mode = epoch = name = None
    facts = {}
    if not isinstance(obj, dict):
        state = None
    elif isinstance(obj.get("args"), dict) and obj.get("mode") in ("pretrain", "finetune"):
        source, state, args, mode, epoch = ("train.py checkpoint", obj.get("model"), obj["args"],
                                            obj["mode"], obj.get("epoch"))
    elif "state_dict" in obj:  # main_pretrain.py / main_finetune.py: epoch is already epoch + 1
        source, state, epoch, name = ("official DropPos checkpoint", obj["state_dict"],
                                      obj.get("epoch"), obj.get("model"))
    elif isinstance(obj.get("args"), argparse.Namespace):
        ns, source, state = obj["args"], "MAE/DropPos save_model", obj.get("model")
        name = getattr(ns, "model", None)
        facts = {k: getattr(ns, k) for k in _NAMESPACE_FACTS if hasattr(ns, k)}
        if isinstance(obj.get("epoch"), int):  # save_model stores the 0-based epoch just done
            epoch = obj["epoch"] + 1
    elif "model" in obj:  # MAE's released files: encoder only, or (visualize) with its decoder
        source, state = "MAE encoder", obj["model"]
    else:
        source, state = "timm encoder", obj
    model, ignored = _rename(state) if _is_state(state) else ({}, [])
    if "encoder.patch_embed.proj.weight" not in model or "encoder.pos_embed" not in model:
        raise UserError(
            f"{str(path)!r} is not a checkpoint train.py can read: {_describe(obj)}; expected a "
            f"train.py checkpoint.pt or encoder.pt, an official DropPos or MAE checkpoint, or a "
            f"timm ViT state dict")
    if source == "timm encoder" and not ignored:  # exactly a ViT's keys: what train.py writes
        source = "train.py encoder"
    have = {k.split(".")[1] for k in model if k.startswith("encoder.")}
    missing = [k for k in _ENCODER if k not in have]  # e.g. "norm" under MAE's global pool
    arch = arch_facts(name) if isinstance(name, str) else {}
    return Imported(model, source, args, mode, epoch, arch,
                    dict(facts, ignored=ignored, missing=missing))


def _count(model, prefix):  # number of blocks under prefix ("encoder.blocks.")
    return len({k[len(prefix):].split(".")[0] for k in model if k.startswith(prefix)})


def encoder_shape(model):
    """Sizes the tensors of an Imported.model tell; heads are not among them (None).

    img_size assumes a square grid; pos_embed is "sincos" when the patch rows are MAE's fixed
    embedding. With a position decoder: decoder_dim, decoder_depth, num_positions (its N)."""
    proj, pos = model["encoder.patch_embed.proj.weight"], model["encoder.pos_embed"]
    dim, p, n = proj.shape[0], proj.shape[-1], pos.shape[1] - 1  # (D, C, p, p), (1, 1+N, D)
    side = math.isqrt(n)
    if side * side != n:
        raise UserError(f"cannot tell the image size of a {n}-patch encoder (not a square "
                              f"grid)")
    fixed = dim % 4 == 0 and torch.allclose(pos[0, 1:].float(), sincos_pos_embed(dim, (side, side)),
                                            rtol=0, atol=1e-5)
    shape = dict(img_size=side * p, patch_size=p, dim=dim, depth=_count(model, "encoder.blocks."),
                 heads=None, pos_embed="sincos" if fixed else "learnable")
    if "decoder.head.weight" in model:
        shape.update(decoder_dim=model["decoder.embed.weight"].shape[0],  # (Dd, D)
                     decoder_depth=_count(model, "decoder.blocks."), decoder_heads=None,
                     num_positions=model["decoder.head.weight"].shape[0])  # (N, Dd)
    return shape


def resize_pos_embed(pos, grid, kind):
    """pos (1, 1+s*s, D) of a square grid -> (1, 1+h*w, D) for grid (h, w); [CLS] row kept.

    "sincos" is a fixed function of the cell, so it is recomputed (interpolating would stretch
    its frequencies); "learnable" is resized bicubically, as MAE's interpolate_pos_embed does."""
    s, dim = math.isqrt(pos.shape[1] - 1), pos.shape[2]
    h, w = grid
    if (h, w) == (s, s):
        return pos
    if kind == "sincos":
        patches = sincos_pos_embed(dim, (h, w)).to(pos)[None]
    else:
        square = pos[:, 1:].reshape(1, s, s, dim).permute(0, 3, 1, 2).float()  # (1, D, s, s)
        square = F.interpolate(square, size=(h, w), mode="bicubic", align_corners=False)
        patches = square.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos.dtype)
    return torch.cat([pos[:, :1], patches], dim=1)

# (dim, depth, heads) of the ViT sizes; tiny is DeiT's, the others are in both repos' models.
_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
          "large": (1024, 24, 16), "huge": (1280, 32, 16)}


def arch_facts(name):
    """Sizes an official arch name tells, e.g. "DropPos_mae_vit_base_patch16_dec512d2b" ->
    dict(name, dim=768, depth=12, heads=12, patch_size=16, decoder_dim=512, decoder_depth=2,
    decoder_heads=16). {} for a name of another form."""
    m = re.fullmatch(r"(DropPos_)?(mae_)?vit_(\w+?)_patch(\d+)(?:_dec(\d+)d(\d+)b)?", name)
    if not m or m[3] not in _SIZES:
        return {}
    dim, depth, heads = _SIZES[m[3]]
    facts = dict(name=name, dim=dim, depth=depth, heads=heads, patch_size=int(m[4]))
    if m[2]:  # a pre-training model; without a dec suffix it is the "recommended" dec512d8b alias
        facts.update(decoder_dim=int(m[5] or 512), decoder_depth=int(m[6] or 8), decoder_heads=16)
    return facts


@functools.lru_cache(maxsize=2)
def _imported(path, stamp):  # stamp: the mtime, so a file written anew is read anew
    return import_state(load_checkpoint(path), path)


def imported(path):
    """The checkpoint at path, read once (parse and build both need it), in our key names."""
    p = Path(path)
    return _imported(str(p), p.stat().st_mtime_ns if p.is_file() else None)


def take_encoder_shape(args, given):
    """Every mode that starts from a checkpoint uses the encoder it holds: its sizes, patch and
    kind of position embedding go into args. train.py's checkpoint.pt records its run's flags, an
    official arch name the head counts; the tensors tell the rest. A typed flag the file
    contradicts is refused, but for --img-size when fine-tuning or probing (the position
    embedding is resized)."""
    path, mode = source_of(args), mode_of(args)
    imp = imported(path)
    if mode == "finetune" and imp.mode == "finetune":
        raise UserError(f"{path!r} is a fine-tuning checkpoint; "
                        f"fine-tune from a pre-training run's "
                        f"checkpoint.pt or encoder.pt")
    shape = dict(encoder_shape(imp.model), heads=imp.arch.get("heads"),
                 decoder_heads=imp.arch.get("decoder_heads"), **imp.extra)
    if imp.args:
        saved = argparse.Namespace(**dict(vars(build_parser().parse_args([])), **imp.args))
        shape.update(model_config(saved))
    keys = ENCODER_SHAPE
    if mode == "evaluate" and "decoder.head.weight" in imp.model:  # the whole DropPos, as trained
        keys += ("decoder_dim", "decoder_depth", "decoder_heads", "mask_ratio", "pos_mask_ratio")
        shape.setdefault("mask_ratio", 0.75), shape.setdefault("pos_mask_ratio", 0.75)
    for key in keys:
        mine = getattr(args, key)
        if shape.get(key) is None:  # heads of a file without flags or arch name
            if key not in given:
                raise UserError(f"{path!r} does not record the number of "
                                f"{key.replace('_', ' ')}; pass "
                                f"{flag(key)} (a train.py checkpoint.pt records it)")
            continue
        resizable = key == "img_size" and mode in ("finetune", "location_probe", "linear_probe")
        if key in given and mine != shape[key] and not resizable:
            raise UserError(f"{flag(key)} {mine} differs from the encoder in {path!r} "
                            f"({shape[key]}): {mode.replace('_', ' ')} uses the encoder as "
                            f"it was trained; drop the flag")
        if key not in given:
            setattr(args, key, shape[key])
    done, total = imp.epoch, (imp.args or {}).get("epochs")
    if done is not None and total and done < total:
        warn(f"{path!r} is an unfinished run: {done} of its {total} epochs were done")


def source_line(args):
    """' from PATH (layout, epoch E of T)' for the start-up line; ' from random weights' etc."""
    path = source_of(args)
    if not path:
        return "" if mode_of(args) == "pretrain" else " from random weights"
    imp = imported(path)
    total = (imp.args or {}).get("epochs")
    epoch = "" if imp.epoch is None else f", epoch {imp.epoch}" + (f" of {total}" if total else "")
    return f" from {path} ({imp.source}{epoch})"


def load_encoder(encoder, args):
    """The checkpoint's encoder weights into `encoder`, its position embedding resized to the
    encoder's grid where the image size changed."""
    path = source_of(args)
    state = {k[len("encoder."):]: v for k, v in imported(path).model.items()
             if k.startswith("encoder.")}
    kind = "learnable" if encoder.pos_embed.requires_grad else "sincos"
    state["pos_embed"] = resize_pos_embed(state["pos_embed"], encoder.grid, kind)
    load_state(encoder, state, f"the encoder in {path!r}")


# ============================================================================================
# 8. The run folder: one live run, whole files, exact resume
# ============================================================================================


def resumed_args(args, given):
    """The flags a run was started with, from its checkpoint; a typed flag that would change the
    run is refused by name, the free ones (FREE_ON_RESUME) replace the saved ones."""
    path = checkpoint_path(args.resume)
    ck = load_training_checkpoint(path)
    saved = dict(vars(build_parser().parse_args([])), **ck["args"])
    for name in sorted(given - FREE_ON_RESUME):
        if getattr(args, name) != saved[name]:
            raise UserError(f"{flag(name)} would change the run in {str(path.parent)!r}: it was started with "
                            f"{saved[name]!r}, you gave {getattr(args, name)!r}. Drop the flag to continue the "
                            f"run as it was, or start a new run with another --output-dir")
    merged = argparse.Namespace(**saved)
    for name in given & FREE_ON_RESUME:
        setattr(merged, name, getattr(args, name))
    if "output_dir" in given and Path(args.output_dir).resolve() != path.parent.resolve():
        raise UserError(f"--resume continues the run in its own folder {str(path.parent)!r}; drop --output-dir")
    if "workers" not in given:
        merged.workers = default_workers(merged.device)
    merged.output_dir, merged.resume = str(path.parent), str(path)
    return merged


def checkpoint_path(resume):
    """The checkpoint --resume names; a folder without one is explained, not just 'missing'."""
    path = Path(resume)
    if not path.is_dir():
        return path
    if (path / "checkpoint.pt").exists():
        return path / "checkpoint.pt"
    owner = live_owner(path)
    if owner:
        raise UserError(f"{str(path)!r} holds no checkpoint yet: its run "
                        f"is still in its first epoch "
                        f"({owner}) and writes one when the epoch ends")
    if (path / "metrics.jsonl").exists() or (path / ".checkpoint.pt.tmp").exists():
        raise UserError(stopped_before_a_checkpoint(path))
    raise UserError(f"{str(path)!r} holds no run (no checkpoint.pt)")


def load_training_checkpoint(path):
    ck = load_checkpoint(path)
    keys = ("mode", "args", "model", "optimizer", "epoch", "step_in_epoch", "ranks", "metrics_rows", "n_train")
    if not isinstance(ck, dict) or not all(k in ck for k in keys):
        raise UserError(f"checkpoint {str(path)!r} is not a training checkpoint of this version of train.py")
    return ck


def load_state(module, state, what):
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:300]
        raise UserError(f"{what} does not match this model: {detail}") from None


def atomic_write(path, write):
    """Write a file whole or not at all: a temporary file beside it, flushed and fsync'ed, then
    renamed over it. A kill or a full disk leaves the previous version intact."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {str(path)!r}: {e.strerror or e}; the previous version, if any, is "
                        f"intact") from None


def readable_state(path, keys):
    try:
        return torch.load(path, map_location="cpu", weights_only=True).keys() == keys
    except Exception:
        return False


def readable_png(path):
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def rng_state():
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), None))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class FolderLock:
    """A live run owns its folder: rank 0 holds `.lock` in it with flock(2) for as long as the run
    lives. The kernel drops the lock when the process dies however it dies (kill -9, power loss), so
    a dead run never blocks its own --resume, and a second run into a live run's folder is refused
    before it touches anything. The file holds the owner's pid and command, for that refusal."""

    def __init__(self, args):
        self.folder, self.args, self.fd = Path(args.output_dir), args, None

    def __enter__(self):
        if int(os.environ.get("RANK", 0)) != 0:  # under torchrun rank 0 holds it for the run
            return self
        f, new_run = self.folder, not self.args.resume
        if f.exists() and not f.is_dir():
            raise UserError(f"--output-dir {str(f)!r} is a file, not a folder")
        try:
            # the folders this creates: a run that fails before writing anything leaves none
            self.made = [p for p in [f, *f.parents] if not p.exists()]
            f.mkdir(parents=True, exist_ok=True)
            created = not (f / ".lock").exists()
            self.fd = os.open(f / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the output folder "
                            f"{str(f)!r}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise UserError(f"{str(f)!r} belongs to a run that is still going ({live_owner(f)}); "
                            f"let it finish or stop it, then continue it with "
                            f"`python train.py --resume {f}`, "
                            f"or start another run in another --output-dir") from None
        try:
            if new_run:
                self.refuse_a_folder_with_a_run(created)
            for stale in f.glob(".*.tmp"):  # a write that a killed run never finished
                stale.unlink()
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"pid {os.getpid()}: {' '.join(sys.argv)}"[:200].encode())
            probe = f / ".write-test"
            # read-only or full: say so before training
            atomic_write(probe, lambda fh: fh.write(b"ok"))
            probe.unlink()
        except BaseException as e:
            self.__exit__(e)
            raise
        return self

    def refuse_a_folder_with_a_run(self, created_lock):
        f = self.folder
        why = None
        if (f / "metrics.jsonl").exists() and not (f / "checkpoint.pt").exists():
            why = stopped_before_a_checkpoint(f)
        elif (f / "evaluation.json").exists():
            why = (f"{str(f)!r} already holds an evaluation; evaluate into another --output-dir, or "
                   f"delete the folder first")
        elif any((f / name).exists() for name in RUN_FILES):
            why = (f"{str(f)!r} already holds a run; continue it with "
                   f"`python train.py --resume {f}`, "
                   f"or start over in another --output-dir (or delete the folder first)")
        if why:
            if created_lock:  # leave the folder as it was
                (f / ".lock").unlink()
            raise UserError(why)

    def __exit__(self, failed=None, *_):
        if self.fd is None:
            return
        if failed and not self.args.resume and [p.name for p in self.folder.iterdir()] == [".lock"]:
            (self.folder / ".lock").unlink()  # a new run that wrote nothing leaves nothing behind
            for p in self.made:
                p.rmdir()
        os.close(self.fd)  # closing drops the lock
        self.fd = None


def stopped_before_a_checkpoint(folder):
    """What a folder whose run died before its first checkpoint holds (no live run is there)."""
    return (f"{str(folder)!r} holds no checkpoint: its run stopped before it wrote the first one "
            f"(at the end of epoch 1), so there is nothing to resume; delete the folder to start "
            f"over there, or choose another --output-dir")


def live_owner(folder):
    """Who holds `folder`'s lock: its pid and command, or None when no live process does."""
    try:
        fd = os.open(Path(folder) / ".lock", os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it: whoever wrote it is dead
    except BlockingIOError:
        for _ in range(20):  # the owner writes its pid right after taking the lock
            text = Path(folder, ".lock").read_text().strip()
            if text:
                return text
            time.sleep(0.05)
        return "a process that is starting up"
    finally:
        os.close(fd)


class RunFolder:
    """Everything exact resume needs, in one place. A new run claims a folder that holds no run;
    a resumed one restores model, optimiser, epoch, step, every process's RNG state and running
    sums, and cuts metrics.jsonl back to the rows its checkpoint had seen."""

    def __init__(self, args, proc, task, optimizer, data):
        self.args, self.proc, self.task, self.optimizer, self.data = args, proc, task, optimizer, data
        self.folder = Path(args.output_dir)
        self.checkpoint = self.folder / "checkpoint.pt"
        self.epoch, self.step, self.rows, self.sums, self.elapsed_before = 0, 0, 0, None, 0.0
        if args.resume:
            self.restore(Path(args.resume))
        torch.manual_seed(args.seed + proc.rank)  # masking differs per process, data order is shared
        random.seed(args.seed + proc.rank)
        if args.resume:
            set_rng_state(self.rng)

    def restore(self, path):
        ck = load_training_checkpoint(path)
        args, task = self.args, self.task
        if ck["mode"] != task.mode:
            raise UserError(f"checkpoint {str(path)!r} is from {ck['mode']}, not {task.mode}")
        if len(ck["ranks"]) != self.proc.world:
            raise UserError(f"the run in {str(self.folder)!r} used {len(ck['ranks'])} process(es); resume it "
                            f"with as many (torchrun --nproc_per_node={len(ck['ranks'])})")
        if ck["n_train"] != len(self.data.train):
            raise UserError(f"the run in {str(self.folder)!r} trained on {ck['n_train']} images, but "
                            f"{len(self.data.train)} are there now; check --data-dir")
        load_state(task.model, ck["model"], f"checkpoint {str(path)!r}")
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"checkpoint {str(path)!r}: optimiser state does not match ({e})") from None
        task.load_state_dict(ck.get("task", {}))
        self.epoch, self.step, self.rows = ck["epoch"], ck["step_in_epoch"], ck["metrics_rows"]
        self.elapsed_before = ck.get("elapsed_s", 0.0)  # absent from checkpoints of older versions
        mine = ck["ranks"][self.proc.rank]
        self.rng, self.sums = mine["rng"], mine["sums"]
        if ck.get("precision", self.proc.precision) != self.proc.precision and self.proc.rank == 0:
            warn(f"the run trained in {ck['precision']} so far and goes "
                 f"on in {self.proc.precision} "
                 f"({self.proc.precision_why}); pass --precision {ck['precision']} to keep it")
        if self.proc.rank == 0 and self.epoch < args.epochs:
            print(f"resumed {str(self.folder)!r} at epoch {self.epoch + 1} step {self.step} "
                  f"({args.epochs} epochs in all)", flush=True)

    def open_log(self, total_steps):
        """The run's Logger, continuing its metrics.jsonl and running sums (a checkpoint saves both)."""
        self.log = Logger(self.folder / "metrics.jsonl", self.rows, self.proc, self.args.log_every,
                          self.data.stream.steps, total_steps, self.epoch * self.data.stream.steps + self.step,
                          self.sums, (self.task.acc_name, self.task.acc_key), self.elapsed_before)
        return self.log

    def save(self, epoch, step):
        """checkpoint.pt for (completed epochs, steps into the next); every process takes part."""
        mine = {"rng": rng_state(), "sums": self.log.epoch_sums.tolist()}
        ranks = [mine]
        if self.proc.world > 1:
            ranks = [None] * self.proc.world
            dist.all_gather_object(ranks, mine)
        failed = None
        if self.proc.rank == 0:
            self.log.sync()
            state = {"mode": self.task.mode, "args": dict(vars(self.args), resume=None),
                     "n_train": len(self.data.train),
                     "model": self.task.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "epoch": epoch, "step_in_epoch": step, "ranks": ranks, "task": self.task.state_dict(),
                     "metrics_rows": self.log.rows, "elapsed_s": self.log.elapsed(),
                     "precision": self.proc.precision}
            try:
                atomic_write(self.checkpoint, lambda f: torch.save(state, f))
            except UserError as e:
                failed = e
        if agree(failed is not None, self.proc):  # every process stops when the write failed
            raise failed or UserError(f"rank 0 could not write {str(self.checkpoint)!r}")

    def stop(self, why, epoch, step, signum):
        """The run stopped after `step` steps of `epoch` (from 0). Ctrl-C or SIGTERM: save, then
        die of that signal; a non-finite loss: stop without saving, naming the last good checkpoint."""
        if why == "interrupted":
            self.save(epoch, step)
            self.say(f"\ninterrupted: saved {self.checkpoint} in epoch {epoch + 1} after step {step}; "
                     f"continue with: python train.py --resume {self.folder}", err=True)
            raise SystemExit(128 + (signum or signal.SIGINT))
        raise UserError(f"the loss became non-finite in epoch {epoch + 1} at step {step}; stopped "
                        f"without saving ({self.last_good()}). Lower --blr"
                        + (", or try --precision fp32" if self.proc.precision == "bf16" else ""))

    def last_good(self):
        return (f"the last good checkpoint is {self.checkpoint}" if self.checkpoint.exists()
                else "no checkpoint was written yet")

    def finish_complete_run(self):
        """Resuming a finished run: check what it left behind, rewrite what is missing or unreadable."""
        rewritten = self.task.write_outputs(self.folder, only_broken=True)
        self.open_log(0)  # cuts metrics.jsonl back to the rows the final checkpoint had seen
        n = self.args.epochs
        self.say(f"the run in {self.folder} is complete ({n} epoch{'s' * (n > 1)})"
                 + (f"; rewrote {', '.join(rewritten)}" if rewritten else "; its files are intact"))
        return self.task.model

    def say(self, line, err=False):
        if self.proc.rank == 0:
            print(line, file=sys.stderr if err else sys.stdout, flush=True)


# ============================================================================================
# 9. Processes and devices: torchrun, precision, stopping together
# ============================================================================================


class Proc(NamedTuple):
    """This process: rank and world size under torchrun (0 and 1 alone), device, precision."""
    rank: int
    world: int
    local: int
    device: torch.device
    precision: str
    precision_why: str = "asked for"


def start_processes(args):
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = 0, 0
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", 0))
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
        rank = dist.get_rank()
    device = pick_device(args.device, local)
    proc = Proc(rank, world, local, device, *pick_precision(args.precision, device))
    if agree(proc.precision == "fp32", proc):  # every process of a run at one precision
        proc = proc._replace(precision="fp32")
    return proc


def pick_device(name, local_rank):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu)")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_precision(name, device):
    """--precision auto, decided by what the hardware is, never by a timing race: bf16 autocast on
    a GPU that supports it, and on a CPU only with bf16 matmul units (avx512_bf16 or AMX), where it
    runs ~2x fp32; elsewhere bf16 matmuls are emulated, ~100x slower.  -> (precision, why)."""
    if name != "auto":
        return name, "asked for"
    if device.type == "cuda":
        fast, why = torch.cuda.is_bf16_supported(), "the GPU's bf16 support"
    else:
        fast, why = (bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}),
                     "avx512_bf16/amx_bf16 in the CPU flags")
    return ("bf16" if fast else "fp32"), f"auto: {'' if fast else 'no '}{why}"


def cpu_flags():
    """The CPU's feature flags as Linux reports them (empty elsewhere: fp32 is the safe default)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split())
                         for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def wrap_model(model, args, proc):
    """The module the loop calls: compiled on request, under DistributedDataParallel with torchrun."""
    if args.compile:
        model = torch.compile(model)
    if proc.world > 1:
        ids = [proc.local] if proc.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def autocast(proc):
    if proc.precision == "bf16":
        return torch.autocast(proc.device.type, dtype=torch.bfloat16)
    return nullcontext()


def agree(flag, proc):
    """Whether any process raised `flag`: one tiny all_reduce, so all of them decide alike."""
    if proc.world == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=proc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


class StopRequest:
    """Ctrl-C and SIGTERM only set a flag, so a run stops between two steps, never half-way through
    an update; a second one quits at once without saving. Under torchrun a worker whose torchrun
    died (kill -9) is not told so by anyone: it checks its parent every second and stops alike."""

    def __enter__(self):
        self.signalled = 0  # the signal's number once one came
        self.old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.active = True
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            threading.Thread(target=self.watch_parent, args=(os.getppid(),), daemon=True).start()
        return self

    def __exit__(self, *_):
        self.active = False
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def watch_parent(self, parent):
        while self.active and not self.signalled:
            time.sleep(1)
            if os.getppid() != parent:  # re-parented: torchrun is gone
                print(f"\ntorchrun (pid {parent}) is gone: saving and stopping",
                      file=sys.stderr, flush=True)
                self.signalled = signal.SIGTERM

    def on_signal(self, signum, _):
        if self.signalled:
            print("\ninterrupted twice: quit without saving", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signalled = signum

    def agreed(self, loss, proc):
        """'non-finite', 'interrupted' or None, the same on every process after the same step. It
        reads one number per step from the device: the price of never leaving a process behind."""
        bad = ~torch.isfinite(loss.detach())
        status = torch.stack([bad.float(), torch.tensor(float(bool(self.signalled)), device=loss.device)])
        if proc.world > 1:
            dist.all_reduce(status, op=dist.ReduceOp.MAX)
        bad, sig = status.tolist()
        return "non-finite" if bad else "interrupted" if sig else None


# ============================================================================================
# 10. Images: photos, synthetic ones, unreadable ones, augmentation
# ============================================================================================


class SyntheticImages(Dataset):
    """Offline images with spatial structure: a sky-to-ground luminance ramp, a left-to-right
    colour ramp and class-dependent stripes, each image jittered by its own seed. Where a patch
    sits is visible in its colour and brightness, so positions are learnable; the stripes'
    frequency and orientation give 10 classes for k-NN and fine-tuning."""

    num_classes = 10

    def __init__(self, n, size, seed=0):
        self.n, self.size, self.seed = n, size, seed
        self.targets = [i % self.num_classes for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(mix_seed(self.seed, i))
        label = i % self.num_classes
        s = self.size
        y = torch.linspace(0, 1, s).view(s, 1).expand(s, s)
        x = torch.linspace(0, 1, s).view(1, s).expand(s, s)
        tint = torch.rand(3, 1, 1, generator=g) * 0.3
        img = torch.stack([0.3 + 0.5 * x, 0.8 - 0.6 * y, 0.9 - 0.5 * y]) * 0.7 + tint
        freq = (label % 5 + 1) * math.pi * 2
        phase = torch.rand(1, generator=g).item() * 2 * math.pi
        stripes = torch.sin(freq * (y if label < 5 else x) + phase)
        img = img + 0.2 * stripes + 0.05 * torch.randn(3, s, s, generator=g)
        return v2.functional.to_pil_image(img.clamp(0, 1)), label


def load_imagefolder(args):
    def folder(path, option):
        if not Path(path).is_dir():
            raise UserError(f"{option} folder {str(path)!r} does not exist")
        try:
            return torchvision.datasets.ImageFolder(str(path), loader=open_image)
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"{option} folder {str(path)!r} holds no images in class sub-folders ({e})") from None

    train = folder(args.data_dir, "--data-dir")
    if not args.val_dir:
        return train, None
    val = folder(args.val_dir, "--val-dir")
    n = len(train.classes) if args.classes is None else args.classes
    if val.classes[:n] != train.classes[:n]:
        raise UserError(f"--val-dir classes {val.classes[:5]}... differ from --data-dir classes {train.classes[:5]}...")
    return train, val


def open_image(path):
    """ImageFolder's loader: the image as RGB or, when it cannot be decoded (truncated, empty, not
    an image), its path, so that the batch goes on without it and the warning can name it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return str(path)

WARNINGS = []  # said once the set-up has passed every check, just before the work starts


def warn(line):
    """A warning: the run goes on, but the user should know (rank 0 only, one line each)."""
    if int(os.environ.get("RANK", 0)) == 0:
        WARNINGS.append(f"warning: {line}")


def say_warnings():
    if WARNINGS:
        print("\n".join(WARNINGS), file=sys.stderr, flush=True)
    WARNINGS.clear()

_warned = set()


def warn_unreadable(paths):
    for p in paths:
        if p not in _warned:
            _warned.add(p)
            print(f"warning: skipped unreadable image {p}", file=sys.stderr, flush=True)


def collate_readable(batch):
    """default_collate of the readable images.  -> images, labels, paths of the unreadable ones."""
    bad = [x for x, _ in batch if isinstance(x, str)]
    good = [item for item in batch if not isinstance(item[0], str)]
    if not good:
        return None, None, bad
    return (*default_collate(good), bad)


class SeededTransform(Dataset):
    """Applies random augmentation seeded by (seed, epoch, index): an image's crop does not depend
    on the number of workers or on where in the epoch a resumed run starts. It seeds only the CPU
    generator, inside a fork that restores it: the global CPU and CUDA streams stay untouched."""

    def __init__(self, base, transform, seed):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        if isinstance(img, str):  # unreadable: its path travels on to the warning
            return img, label
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, self.epoch, i))
            return self.transform(img), label


def train_transform(size, finetune=False, mae_augment=False):
    """Per-image augmentation, PIL image -> normalised float (3, size, size): RandomResizedCrop + flip.

    mae_augment (fine-tuning, --recipe paper) is MAE's build_transform, i.e. timm's create_transform
    with 'rand-m9-mstd0.5-inc1' and RandomErasing 'pixel': RandAugment on the PIL image after the
    flip, as timm orders them, and after normalising, RandomErasing with p 0.25 and per-pixel N(0, 1)
    values (area 2 %-1/3, aspect 0.3-1/0.3). No colour jitter: timm turns it off under RandAugment.
    """
    crop = v2.RandomResizedCrop(size, scale=crop_scale(finetune), interpolation=v2.InterpolationMode.BICUBIC,
                                antialias=True)
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if not mae_augment:
        return v2.Compose([v2.ToImage(), crop, v2.RandomHorizontalFlip(), *to_float])
    return v2.Compose([crop, v2.RandomHorizontalFlip(), NoisyRandAugment(), v2.ToImage(), *to_float,
                       v2.RandomErasing(p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random")])


class NoisyRandAugment(nn.Module):
    """timm's RandAugment 'rand-m9-mstd0.5-inc1' (MAE's --aa) built on torchvision's RandAugment ops.

    As timm: `num_ops` ops drawn with replacement, each applied with probability `op_prob`, each at
    its own level drawn from N(magnitude, magnitude_std) clipped to [0, 10] (level m = m/10 of the
    op's maximum), the ImageNet mean as fill colour, bicubic on PIL images (bilinear on tensors,
    the best torchvision offers there). Levels are rounded to tenths. Every draw comes from torch's
    RNG, so `SeededTransform` replays it. Unlike timm's 'inc1' set, torchvision's ops include
    Identity and lack Invert and SolarizeAdd, and Posterize keeps 8 -> 4 bits (timm 4 -> 0).
    """

    LEVELS = 10  # timm's magnitude scale

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, op_prob=0.5,
                 fill=tuple(round(255 * m) for m in MEAN)):
        super().__init__()
        self.num_ops, self.magnitude, self.magnitude_std, self.op_prob = num_ops, magnitude, magnitude_std, op_prob
        bins = 10 * self.LEVELS + 1  # bin k: level k/10
        self.pil_op = v2.RandAugment(num_ops=1, num_magnitude_bins=bins, fill=list(fill),
                                     interpolation=v2.InterpolationMode.BICUBIC)
        self.tensor_op = v2.RandAugment(num_ops=1, num_magnitude_bins=bins, fill=list(fill),
                                        interpolation=v2.InterpolationMode.BILINEAR)

    def sample_bin(self):
        """One op's magnitude bin: a level from N(magnitude, std), clipped to [0, 10], in tenths."""
        level = (self.magnitude + self.magnitude_std * torch.randn(())).clamp(0, self.LEVELS)
        return int(torch.round(level * 10))

    def forward(self, img):
        op = self.pil_op if isinstance(img, Image.Image) else self.tensor_op
        for _ in range(self.num_ops):
            if torch.rand(()) < self.op_prob:
                op.magnitude = self.sample_bin()
                img = op(img)
        return img


def eval_crop_pct(args):
    """Share of the resized image that evaluation keeps: the whole square (laptop), or MAE's 224/256
    up to 224 px (paper), so 224 px images are resized to 256 and lose their border, as ImageNet
    evaluation does."""
    return 224 / 256 if args.recipe == "paper" and args.img_size <= 224 else 1.0


def eval_transform(size, crop_pct=1.0):
    """Resize the shorter side to int(size / crop_pct) (bicubic), centre-crop size×size, normalise."""
    return v2.Compose([v2.ToImage(),
                       v2.Resize(int(size / crop_pct), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


# ============================================================================================
# 11. --evaluate
# ============================================================================================


def evaluate(args):
    """--evaluate: score a checkpoint without training anything. With a position head (train.py's
    pre-training checkpoint, the official DropPos one): position top-1, within one cell and
    distance at its ratios, and the picture; for every encoder k-NN top-1; for a fine-tuning
    checkpoint test top-1. Each number next to its chance. evaluation.json and one JSON line."""
    proc = start_processes(args)
    data = Data(args, proc)
    torch.manual_seed(args.seed)
    path, folder = args.evaluate, Path(args.output_dir)
    imp = imported(path)
    results = {"checkpoint": path, "source": imp.source, "epoch": imp.epoch}
    head = "decoder.head.weight" in imp.model
    if head:  # the whole DropPos, position head included
        model = build_droppos(model_config(args)).to(proc.device).eval()
        load_state(model, imp.model, f"the model in {path!r}")
        encoder = model.encoder
    elif imp.mode == "finetune":  # train.py's classifier
        model = Classifier(build_encoder(args), data.num_classes, imp.args.get("recipe") == "paper")
        load_state(model, load_checkpoint(path)["model"], f"the classifier in {path!r}")
        encoder = model.to(proc.device).encoder
    else:
        encoder = build_encoder(args).to(proc.device)
    say_warnings()
    if head:
        scores, beliefs = head_positions(model, data, args, proc)
        chance = chance_of_grid(model.grid, "test_pos")
        results.update(scores, **{f"{k}_chance": v for k, v in chance.items()},
                       mask_ratio=args.mask_ratio, pos_mask_ratio=args.pos_mask_ratio)
        imgs = data.picture_images() if proc.rank == 0 else None
        if imgs is not None:
            save_reassembly(model, imgs, folder / "reassembly.png", proc, beliefs["test_pos"])
    elif imp.mode == "finetune":
        results["test_top1"] = evaluate_classifier(model, data, args, proc)
    results.update(knn_top1=run_knn(encoder, data, args, proc), top1_chance=100 / data.num_classes)
    if proc.rank == 0:
        line = json.dumps(results)
        atomic_write(folder / "evaluation.json", lambda f: f.write(line.encode() + b"\n"))
        print(line, flush=True)


# ============================================================================================
# 12. Pictures: reassembly.png, the head's beliefs, curves.png
# ============================================================================================

GIVEN, CORRECT, CLASH = (0, 200, 0), (255, 200, 0), (230, 0, 0)  # border colours in reassembly.png

LEGEND = ("green: position given  ·  yellow: patch in its true cell  ·  "
          "red k: k patches sent to one cell, the surest shown  ·  grey: no patch")


def save_reassembly(model, imgs, path, proc, beliefs=None):
    """reassembly.png: 8 held-out images (ImageNet-normalised) as the model puts them back together.

    The mask is seeded and the training RNG left untouched, so the pictures of different epochs
    show the same patches and a resumed run stays exact.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng([proc.device] if proc.device.type == "cuda" else []), autocast(proc):
        torch.default_generator.manual_seed(0)
        if proc.device.type == "cuda":
            torch.cuda.manual_seed(0)
        imgs = imgs.to(proc.device)
        out = model(imgs, 0.0)
        B, N = len(imgs), model.encoder.num_patches
        everywhere = torch.arange(N, device=proc.device).expand(B, N)  # every patch: weights sum to 1 over N
        weights = droppos.attentive_weights(model.encoder, imgs, everywhere, model.tau)  # (B, N)
    model.train(was_training)
    rows, info = reassembly_rows(denormalize(imgs.float()).cpu(), out.ids_keep.cpu(), out.dropped.cpu(),
                                 out.logits.float().softmax(-1).cpu(), weights.float().cpu(), model.grid,
                                 model.encoder.patch_size)
    labels = ["original", f"visible ({round(100 * model.n_vis / N)}%)", "predicted", "attention"]
    caption = (f"position accuracy on dropped patches: {100 * out.acc.item():.1f}%  ·  "
               f"attention: each patch's weight in the loss, hot = high\n{LEGEND}")
    picture = draw_reassembly(rows, info, max(1, math.ceil(128 / imgs.shape[-1])), labels, caption)
    if beliefs is not None and len(beliefs[1]):  # below: what the head predicts on the held-out set
        below = draw_beliefs(*beliefs, model.grid)
        both = Image.new("RGB", (max(picture.width, below.width), picture.height + below.height),
                         "white")
        both.paste(picture, (0, 0)), both.paste(below, (0, picture.height))
        picture = both
    atomic_write(path, lambda f: picture.save(f, format="PNG"))


def reassembly_rows(pixels, ids_keep, dropped, probs, weights, grid, patch_size):
    """The picture's rows as images (B, 3, H, W) in [0, 1], and the cells the drawing marks.

    pixels (B, 3, H, W) in [0, 1]; ids_keep, dropped (B, n); probs (B, n, N); weights (B, N).
    """
    B, n, N = probs.shape
    patches = patchify(pixels, patch_size)  # (B, N, p·p·3)
    vis = droppos.gather_tokens(patches, ids_keep)  # (B, n, p·p·3)
    grey = torch.full_like(patches, 0.5)
    cells = torch.arange(N)
    conf, pred = probs.max(-1)  # (B, n)
    claims = pred[..., None] == cells  # (B, n, N)
    count = claims.sum(1)  # (B, N)
    # scatter with repeated indices keeps an arbitrary writer; on a collision we want the surest one
    winner = torch.where(claims, conf[..., None], -1.0).argmax(1)  # (B, N)
    t = weights / weights.amax(1, keepdim=True)  # (B, N), hottest patch at 1 in every image
    hot = heat(t)  # black → red → yellow → white
    lum = patchify(pixels.mean(1, keepdim=True).expand_as(pixels), patch_size)  # grey copy: colour = heat
    rows = dict(original=patches,
                visible=grey.scatter(1, ids_keep[..., None].expand_as(vis), vis),
                predicted=torch.where((count > 0)[..., None], droppos.gather_tokens(vis, winner), grey),
                attention=0.3 * lum + 0.7 * repeat(hot, "b n c -> b n (pp c)", pp=patch_size ** 2))
    info = dict(patch_size=patch_size,
                kept=torch.zeros(B, N, dtype=torch.bool).scatter(1, ids_keep, ~dropped),  # (B, N)
                correct=(ids_keep.gather(1, winner) == cells) & (count > 0),  # (B, N)
                collisions=[[(c, k) for c, k in enumerate(row) if k >= 2] for row in count.tolist()])
    return {k: unpatchify(v, patch_size, grid).clamp(0, 1) for k, v in rows.items()}, info


def draw_reassembly(rows, info, scale, labels, caption):
    """Enlarge the rows (nearest neighbour), label them at the left, mark cells, caption on top."""
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=10)
    B, _, H, W = next(iter(rows.values())).shape
    c, w, gap, line = info["patch_size"] * scale, W // info["patch_size"], 6, 20  # c: cell side in px
    label_w = max(font.getbbox(s)[2] for s in labels) + 2 * gap
    lines = caption.split("\n")
    size = (max(label_w + B * (W * scale + gap), max(font.getbbox(s)[2] for s in lines) + 2 * gap),
            gap + line * len(lines) + len(rows) * (H * scale + gap))
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((gap, gap), caption, fill="black", font=font, spacing=line - 15)
    for r, (name, img) in enumerate(rows.items()):
        y0 = gap + line * len(lines) + r * (H * scale + gap)
        draw.text((gap, y0 + H * scale // 2), labels[r], fill="black", font=font, anchor="lm")
        big = F.interpolate(img.float(), scale_factor=scale, mode="nearest").mul(255).round().byte()
        for b in range(B):
            x0 = label_w + b * (W * scale + gap)
            canvas.paste(Image.fromarray(big[b].permute(1, 2, 0).numpy()), (x0, y0))
            clashes = info["collisions"][b] if name == "predicted" else []
            marks = {"visible": [(k, GIVEN) for k in info["kept"][b].nonzero().flatten().tolist()],
                     "predicted": [(k, CORRECT) for k in info["correct"][b].nonzero().flatten().tolist()]
                     + [(k, CLASH) for k, _ in clashes]}.get(name, [])
            for k, colour in marks:  # inside the cell, so neighbouring borders never overlap
                x, y = x0 + k % w * c, y0 + k // w * c
                draw.rectangle([x, y, x + c - 1, y + c - 1], outline=colour, width=max(1, c // 8))
            for k, count in clashes:  # the count on a red tab in the corner; a wider label would hide the patch
                x, y = x0 + k % w * c, y0 + k // w * c
                box = draw.textbbox((x + 1, y + 1), str(count), font=small, anchor="lt")
                draw.rectangle([x, y, box[2] + 1, box[3] + 1], fill=CLASH)
                draw.text((x + 1, y + 1), str(count), fill="white", font=small, anchor="lt")
    return canvas

FONT, SMALL = ImageFont.load_default(size=14), ImageFont.load_default(size=11)

CELL, PAD = 16, 8  # px per cell of maps A and B, px margin

ORIGIN = (PAD, 68)  # top left of map A; map B starts (h + 2) * CELL to its right

TRUE, ARGMAX, EMPTY = (0, 220, 255), (0, 200, 0), (200, 200, 200)  # cyan, green, no data

SKIP = {"epoch", "step", "summary", "skipped_images", "elapsed_s", "images_per_sec", "best_top1"}

PW, PH, THIN, THICK = 280, 160, (90, 120, 200), (210, 70, 0)  # curve panel px; progress, summary


def heat(t):
    """(...) in [0, 1] -> (..., 3) floats: black -> red -> yellow -> white."""
    return torch.stack([3 * t, 3 * t - 1, 3 * t - 2], -1).clamp(0, 1)


def row_col_beliefs(probs, true_pos, grid):
    """(h, h) and (w, w): [i, j] is the mean mass put on row (column) j by the patches whose true
    row (column) is i. Rows sum to 1; a row no patch has is NaN. probs: (M, N), true_pos: (M,)."""
    h, w = grid
    p = probs.float().view(-1, h, w)
    out = []
    for true, mass, n in ((true_pos // w, p.sum(2), h), (true_pos % w, p.sum(1), w)):
        total = mass.new_zeros(n, n).index_add_(0, true, mass)  # (n, n) mass per true line
        out.append(total / torch.bincount(true, minlength=n)[:, None])  # 0 / 0 = NaN: no patches
    return tuple(out)


def heat_image(values, vmax, cell):
    """(a, b) values -> PIL image of a x b squares of `cell` px coloured by values / vmax."""
    rgb = heat(values.float() / vmax)
    rgb[values.isnan()] = torch.tensor(EMPTY) / 255
    return Image.fromarray(rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
                           .mul(255).round().byte().numpy())


def draw_beliefs(probs, true_pos, grid, examples=4):
    """probs: (M, N) predicted distributions, true_pos: (M,) long, grid: (h, w) -> RGB image.
    A: true row x predicted row (row_col_beliefs), B: the same for columns, on one scale;
    C: `examples` evenly spaced patches, each over the grid, on a scale of their own."""
    h, w = grid
    probs, true_pos = probs.detach().float().cpu(), true_pos.detach().long().cpu()
    rows, cols = row_col_beliefs(probs, true_pos, grid)
    s = position_scores(probs, true_pos, grid)
    img = Image.new("RGB", (4000, 2000), "white")  # ample; cropped to what is drawn
    d = ImageDraw.Draw(img)
    d.multiline_text((PAD, PAD), spacing=6, fill="black", font=FONT, text=(
        f"{len(probs)} patches, {h}x{w} grid. A, B: mean mass per predicted row / column "
        f"(across) by true one (down). C: patches, cyan = true cell, green = argmax\n"
        f"top-1 {s['top1']:.1%} (chance {s['chance_top1']:.1%})   within one cell "
        f"{s['within1']:.1%} (chance {s['chance_within1']:.1%})   mean distance "
        f"{s['distance']:.2f} cells (chance {s['chance_distance']:.2f})"))
    x, y = ORIGIN
    vmax = max(rows.nan_to_num(0).max().item(), cols.nan_to_num(0).max().item())
    for m, title in ((rows, "A rows"), (cols, "B columns")):
        d.text((x, y - 4), title, "black", FONT, anchor="ld")
        img.paste(heat_image(m, vmax, CELL), (x, y))
        d.rectangle([x - 1, y - 1, x + len(m) * CELL, y + len(m) * CELL], outline="grey")
        x += (len(m) + 2) * CELL
    bars = [(x, y, max(h, w) * CELL, vmax, {f"1/{h}": 1 / h, f"1/{w}": 1 / w})]  # h = w: 1 mark
    idx = torch.linspace(0, len(probs) - 1, min(examples, len(probs))).round().long().unique()
    c, x, y, vmax = CELL // 2, PAD, y + (max(h, w) + 3) * CELL, probs[idx].max().item()
    d.text((x, y - 4), "C patches", "black", FONT, anchor="ld")
    for k in idx.tolist():
        img.paste(heat_image(probs[k].view(h, w), vmax, c), (x, y))
        d.rectangle([x - 1, y - 1, x + w * c, y + h * c], outline="grey")  # white cells show
        t, a = true_pos[k].item(), probs[k].argmax().item()
        tx, ty, ax, ay = x + t % w * c, y + t // w * c, x + a % w * c, y + a // w * c
        d.rectangle([tx, ty, tx + c - 1, ty + c - 1], outline=TRUE, width=2)
        d.rectangle([ax + 2, ay + 2, ax + c - 3, ay + c - 3], fill=ARGMAX)  # inside an outline
        x += w * c + 2 * PAD
    bars.append((x, y, h * c, vmax, {"1/N": 1 / (h * w)}))
    for x, y, n, vmax, marks in bars:  # colour scales, n px tall: 0 at the bottom, chance ticked
        img.paste(heat_image(torch.linspace(vmax, 0, n)[:, None].expand(-1, 12), vmax, 1), (x, y))
        d.text((x, y - 2), f"{vmax:.3g}", "black", SMALL, anchor="ld")
        d.text((x, y + n + 2), "0", "black", SMALL, anchor="lt")
        ty = [y + round((1 - v / vmax) * (n - 1)) for v in marks.values()]
        for t in ty:
            d.line([x - 3, t, x + 15, t], fill=TRUE, width=2)
        d.text((x + 18, sum(ty) / len(ty)), ", ".join(f"{k} = {v:.3g}" for k, v in marks.items()),
               "black", SMALL, anchor="lm")  # one label: 1/h and 1/w may be close
    box = ImageChops.invert(img).getbbox()  # the drawn part: not white
    return img.crop((0, 0, box[2] + PAD, box[3] + PAD))


def finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def steps_per_epoch(progress, summaries):
    """train.py logs each epoch's last step, so the first summarised epoch e ends at its largest
    step = e * steps_per_epoch. Before any summary: the rows' largest step / largest epoch."""
    done = {r["epoch"] for r in progress} & {r["epoch"] for r in summaries} - {0}
    rs = [r for r in progress if r["epoch"] == min(done)] if done else progress
    return max([r["step"] for r in rs], default=1) / max([r["epoch"] for r in rs] + [1]) or 1.0


def draw_curves(rows, chance=None, columns=3):
    """metrics.jsonl rows (list of dicts) -> RGB image: a panel per numeric key over epochs, a
    summary at its epoch, a progress row at step / steps_per_epoch; NaN or missing: skipped.
    chance: key -> value in the rows' unit. "acc" is a fraction, drawn x 100; the rest as is."""
    summ = [r for r in rows if r.get("summary") and finite(r.get("epoch"))]
    prog = [r for r in rows if not r.get("summary") and finite(r.get("epoch"))
            and finite(r.get("step"))]
    spe = steps_per_epoch(prog, summ)
    keys = dict.fromkeys(k for r in prog + summ for k, v in r.items() if k not in SKIP
                         and finite(v))
    unit = {k: 100 if k == "acc" else 1 for k in keys}
    lines = {k: [sorted((x(r), r[k] * unit[k]) for r in rs if finite(r.get(k)))
                 for rs, x in ((prog, lambda r: r["step"] / spe), (summ, lambda r: r["epoch"]))]
             for k in keys}
    xmax = max((x for thin, thick in lines.values() for x, _ in thin + thick), default=1) or 1
    caption = (f"x: epochs, progress rows at step / {spe:g}.  Thin line: progress rows, dots: "
               "epoch summaries, grey: chance" if keys else f"{len(rows)} rows, nothing to draw")
    img = Image.new("RGB", (max(min(columns, len(keys)) * PW, round(FONT.getlength(caption)))
                            + 2 * PAD, 28 + math.ceil(len(keys) / columns) * PH), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD, PAD), caption, "black", FONT)
    for i, (k, (thin, thick)) in enumerate(lines.items()):
        x0, y0 = PAD + i % columns * PW, 28 + i // columns * PH
        px0, py0, px1, py1 = x0 + 48, y0 + 18, x0 + PW - 12, y0 + PH - 22
        c = None if (chance or {}).get(k) is None else chance[k] * unit[k]
        ys = [y for _, y in thin + thick] + [c] * (c is not None)
        lo, hi = min(ys), max(ys)
        a, b = (lo, hi) if hi > lo else (lo - 1, hi + 1)  # a flat line sits mid-panel

        def at(x, y):  # data -> px, 4 px inside the frame
            return px0 + x / xmax * (px1 - px0), py1 - 4 - (y - a) / (b - a) * (py1 - py0 - 8)
        d.text((x0 + 4, y0 + 2), "acc (%)" if k == "acc" else k, "black", SMALL)
        d.rectangle([px0, py0, px1, py1], outline="grey")
        for v in (lo, hi):
            d.text((px0 - 4, at(0, v)[1]), f"{v:.3g}", "black", SMALL, anchor="rm")
        d.text(((px0 + px1) / 2, py1 + 4), f"epoch 0 to {xmax:g}", "black", SMALL, anchor="mt")
        if c is not None:
            d.line([px0, at(0, c)[1], px1, at(0, c)[1]], fill="grey")
            d.text((px1 - 3, at(0, c)[1] - 2), "chance", "grey", SMALL, anchor="rd")
        for pts, colour, width, r in ((thin, THIN, 1, 2 * (len(thin) == 1)), (thick, THICK, 2, 3)):
            pts = [at(*p) for p in pts]
            d.line(pts, fill=colour, width=width)  # PIL draws no line through a single point
            for x, y in pts:  # dots: summaries and a lone progress row
                d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return img


# ============================================================================================
# 13. Logging
# ============================================================================================


class Logger:
    """Progress lines on stdout and one JSON object per line in metrics.jsonl (rank 0 writes).

    Running sums stay on the device and are read only when a line is due, every --log-every
    seconds. Epochs are counted from 1 in both places; `step` in metrics.jsonl counts optimiser
    steps over the whole run.
    """

    def __init__(self, path, rows_kept, proc, every_s, steps_per_epoch, total_steps, first_step, epoch_sums,
                 acc_names, elapsed_before):
        self.path, self.proc, self.every_s = path, proc, every_s
        # (console name, metrics.jsonl key); metrics.jsonl holds every accuracy in percent (rows of
        # versions before the key was pos_top1 / train_top1 held "acc" as a fraction)
        self.acc_name, self.acc_key = acc_names
        self.epochs = total_steps // steps_per_epoch
        self.steps_per_epoch, self.total_steps, self.first_step = steps_per_epoch, total_steps, first_step
        self.sums = torch.zeros(3, device=proc.device)  # loss, accuracy, steps since the last line
        self.epoch_sums = torch.tensor(epoch_sums or [0.0, 0.0, 0.0], device=proc.device)
        self.rows, self.file = rows_kept, None
        self.t_start = self.t_last = time.time()
        self.elapsed_before = elapsed_before  # earlier sittings of this run, up to its checkpoint
        self.imgs_since, self.timed, self.clock = 0, False, None
        if proc.rank == 0:
            self.cut_metrics(rows_kept)

    def cut_metrics(self, rows):
        """Keep the rows the checkpoint had seen; rows written after it are about to be redone."""
        if not self.path.exists():
            return
        lines = self.path.read_bytes().splitlines(keepends=True)
        if len(lines) != rows:
            atomic_write(self.path, lambda f: f.writelines(lines[:rows]))

    def header(self, line):
        if self.proc.rank == 0:
            print(line, flush=True)

    def step(self, epoch, step, loss, acc, n_imgs, lr, extra):
        """Count one step (epoch from 0, step from 1 within it); write a line when one is due."""
        stat = torch.stack([loss.detach().float(), acc.detach().float(), torch.ones((), device=loss.device)])
        self.sums += stat
        self.epoch_sums += stat
        self.imgs_since += n_imgs * self.proc.world
        now, done = time.time(), epoch * self.steps_per_epoch + step
        if self.clock is None:  # the first step of a sitting warms up (and compiles): time the rest
            self.clock = (now, done)
        if now - self.t_last < self.every_s and step != self.steps_per_epoch:
            return
        # This process's share only: the processes log at different steps, so no collective here.
        loss_mean, acc_mean = self.mean(self.sums, across=False)
        ips = self.imgs_since / max(now - self.t_last, 1e-9)
        per_step = (now - self.clock[0]) / max(done - self.clock[1], 1)
        left = (self.total_steps - done) * per_step
        self.write({"epoch": epoch + 1, "step": done, "loss": loss_mean,
                    self.acc_key: 100 * acc_mean,
                    "lr": lr, **extra, "images_per_sec": ips},
                   f"epoch {epoch + 1}/{self.epochs}  step {step}/{self.steps_per_epoch}  loss {loss_mean:.4f}  "
                   f"{self.acc_name} {100 * acc_mean:.2f}%  lr {lr:.2e}  "
                   + "".join(f"{'σ' if k == 'sigma' else k} {v:.3f}  " for k, v in extra.items())
                   + f"{ips:.0f} img/s  left {fmt_time(left)}")
        if not self.timed and done - self.clock[1] >= 5:
            self.timed = True
            self.header(f"timed {done - self.clock[1]} steps after the "
                        f"first: {per_step:.2f} s/step, so "
                        f"the {self.total_steps - self.first_step} steps left take about "
                        f"{fmt_time(per_step * (self.total_steps - self.first_step))} (plus evaluation)")
        self.sums.zero_()
        self.t_last, self.imgs_since = now, 0

    def draw_curves(self, chance):
        """curves.png from metrics.jsonl: a run's learning curves, redrawn after every epoch."""
        if self.proc.rank == 0:
            self.sync()
            rows = [json.loads(line) for line in self.path.read_text().splitlines()]
            picture = draw_curves(rows, chance)
            atomic_write(self.path.with_name("curves.png"), lambda f: picture.save(f, format="PNG"))

    def epoch_summary(self, epochs_done, results, left_out):
        loss_mean, acc_mean = self.mean(self.epoch_sums, across=True)
        self.epoch_sums.zero_()
        elapsed = self.elapsed()
        extra = "".join(f"  {k} {v:.2f}{'' if k.endswith('distance') else '%'}"
                        for k, v in results.items())
        self.write({"epoch": epochs_done, "summary": True, "loss": loss_mean,
                    self.acc_key: 100 * acc_mean,
                    **results,
                    "skipped_images": left_out, "elapsed_s": elapsed},
                   f"== epoch {epochs_done}/{self.epochs} done  loss {loss_mean:.4f}  {self.acc_name} "
                   f"{100 * acc_mean:.2f}%{extra}  "
                   f"elapsed {fmt_time(elapsed)}")

    def elapsed(self):
        """Wall seconds of the run's kept work, summed over every sitting (a resume continues it)."""
        return self.elapsed_before + time.time() - self.t_start

    def mean(self, sums, across):
        if across and self.proc.world > 1:
            sums = sums.clone()
            dist.all_reduce(sums)
        s = sums.tolist()
        return [v / max(s[-1], 1) for v in s[:-1]]

    def write(self, record, line):
        if self.proc.rank != 0:
            return
        try:
            if self.file is None:  # created with its first row: a run that logged nothing leaves no log
                self.file = open(self.path, "a")
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise UserError(f"could not write {str(self.path)!r}: {e.strerror or e}") from None
        self.rows += 1
        print(line, flush=True)

    def sync(self):
        """metrics.jsonl on disk before the checkpoint that counts its rows."""
        if self.file is not None:
            os.fsync(self.file.fileno())


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ============================================================================================
# 14. Benchmark
# ============================================================================================


def matmul_flops(device, dtype, max_n=None, budget_s=0.3):
    """Measured FLOP/s of large square matmuls: the peak a training step can hope for."""
    max_n = max_n or (8192 if device.type == "cuda" else 2048)
    n, per_call = 256, 0.0
    while True:  # grow the size until one product takes long enough to time, or is large
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        per_call = _time(lambda: a @ b, device, reps=1)
        if per_call > 0.02 or n >= max_n:
            break
        n *= 2
    reps = max(1, int(budget_s / max(per_call, 1e-6)))
    return 2 * n ** 3 / _time(lambda: a @ b, device, reps)


def _time(fn, device, reps):
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def droppos_flops(cfg):
    """Model FLOPs of one pre-training image, counted analytically.

    A linear layer of a token costs 2·in·out FLOPs; attention costs 4·n·D per token (QKᵀ and
    AV); a block on n tokens costs n·(24·D² + 4·n·D) (qkv 3D², proj D², MLP 8D², times 2).
    Backward costs twice the forward of what gets gradients. The attentive pass is one forward
    over all N patches. Norms, softmax and GELU are left out: they are not matmuls.
    """
    D, Dd, N = cfg["dim"], cfg["decoder_dim"], (cfg["img_size"] // cfg["patch_size"]) ** 2
    n = int(N * (1 - cfg["mask_ratio"])) + 1  # + [CLS]
    patch_in = 3 * cfg["patch_size"] ** 2
    block = lambda tokens, d: tokens * (24 * d * d + 4 * tokens * d)
    encoder = cfg["depth"] * block(n, D) + 2 * (n - 1) * patch_in * D
    decoder = 2 * n * D * Dd + cfg["decoder_depth"] * block(n, Dd) + 2 * (n - 1) * Dd * N
    attentive = cfg["depth"] * block(N + 1, D) + 2 * N * patch_in * D
    return 3 * (encoder + decoder) + (attentive if cfg["attentive"] else 0)


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def benchmark(args):
    """Time training steps after warm-up on an in-memory batch, then with the data stream."""
    device = pick_device(args.device, 0)
    proc = Proc(0, 1, 0, device, *pick_precision(args.precision, device))
    torch.manual_seed(args.seed)
    cfg = model_config(args)
    model = build_droppos(cfg).to(device)
    groups = param_groups(model, args.weight_decay, no_decay=no_decay_rule(args.recipe, "pretrain"))
    optimizer = make_optimizer(groups, (0.9, 0.95), device)
    net = wrap_model(model, args, proc)
    imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)

    def step(x):
        with autocast(proc):
            loss = net(x, 0.5).loss
        optimizer_step(model, optimizer, loss, args.clip_grad, per_parameter_clip(args.recipe, "pretrain"))

    rss_before_mb = rss_mb()
    for _ in range(args.bench_warmup):
        step(imgs)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.bench_steps):
        t = time.perf_counter()
        step(imgs)
        sync(device)
        times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:  # growth of the process's peak resident memory over what it held before the first step
        # (model, inputs, libraries): activations, gradients and optimiser state. Measured from
        # before warm-up because freed activations stay resident afterwards.
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before_mb
    gflops = droppos_flops(cfg) / 1e9
    peaks = {p: matmul_flops(device, torch.float32 if p == "fp32" else torch.bfloat16) / 1e9
             for p in ("fp32", "bf16")}
    ips = args.batch_size / step_s
    result = {"device": str(device), "precision": proc.precision, "batch_size": args.batch_size,
              "model": {k: cfg[k] for k in ("img_size", "patch_size", "dim", "depth", "heads", "decoder_dim",
                                            "decoder_depth", "decoder_heads")},
              "images_per_sec": round(ips, 1), "step_ms": round(1000 * step_s, 1),
              "peak_memory_mb": round(peak_mb, 1), "gflops_per_image": round(gflops, 3),
              "achieved_gflops": round(ips * gflops, 1),
              "peak_gflops_fp32": round(peaks["fp32"], 1), "peak_gflops_bf16": round(peaks["bf16"], 1),
              "utilization": round(ips * gflops / peaks[proc.precision], 3), "threads": torch.get_num_threads()}
    try:
        with_data = bench_with_data(args, step, proc)
        result["images_per_sec_with_data"] = None if with_data is None else round(with_data, 1)
    except UserError as e:
        result["images_per_sec_with_data"], result["data_error"] = None, str(e)
    print(json.dumps(result), flush=True)


def bench_with_data(args, step, proc):
    """Images/s of the same step fed by the training stream (load, augment, move to the device).
    None when the stream ran out before a step could be timed."""
    stream = Data(args, proc).stream
    n, t = 0, None
    for i, (imgs, _) in stream.epoch(0):
        if i == args.bench_warmup + args.bench_steps:
            break
        if i == args.bench_warmup:
            sync(proc.device)
            t = time.perf_counter()
        step(imgs)
        if t is not None:
            n += imgs.shape[0]
    sync(proc.device)
    return n / (time.perf_counter() - t) if t and n else None

if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        # Stopped by Ctrl-C or SIGTERM, with the checkpoint saved: die of that signal, as a shell
        # expects, so `for s in 0 1 2; do python train.py ...; done` stops instead of going on.
        if e.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            signal.signal(e.code - 128, signal.SIG_DFL)
            os.kill(os.getpid(), e.code - 128)
        raise
