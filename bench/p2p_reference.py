"""A re-implementation of the reference Prompt-to-Prompt controller on a diffusers UNet, for benchmarks.

NOT the diffusers community script (``examples/community/pipeline_prompt2prompt.py`` is not packaged and
cannot be fetched offline): a re-implementation written for this benchmark of the same algorithm and,
importantly, the same *compute pattern* as the authors' notebook and that script:

- an ``AttnProcessor`` on every attention layer computes ``attn.get_attention_scores`` (the full
  probabilities, all rows, self- and cross-attention) and hands them to the controller;
- the controller stores the conditional half of every map with at most 32x32 queries for every step
  (``AttentionStore``), then edits: word swap ``A_tgt = A_src M`` on cross-attention while
  ``step < int(cross * (steps + 1))``, self-attention ``A_tgt = A_src`` at <= 16x16 while
  ``step < int(self * steps)`` (``AttentionReplace``);
- the sampling loop is DDIM with one UNet call per step on ``[uncond x rows, cond x rows]``.
"""
from __future__ import annotations

from collections import defaultdict

import torch


class ReferenceReplaceController:
    def __init__(self, rows: int, steps: int, mapper: torch.Tensor, cross_replace: float, self_replace: float,
                 num_att_layers: int):
        self.rows = rows
        self.mapper = mapper  # [targets, 77, 77]
        self.num_att_layers = num_att_layers
        self.cross_end = int(cross_replace * (steps + 1))
        self.self_end = int(steps * self_replace)
        self.cur_step = 0
        self.cur_att_layer = 0
        self.step_store: dict[str, list] = defaultdict(list)
        self.attention_store: dict[str, list] = {}

    def __call__(self, attn: torch.Tensor, is_cross: bool, place: str) -> torch.Tensor:
        h = attn.shape[0]
        attn[h // 2:] = self.forward(attn[h // 2:], is_cross, place)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()
        return attn

    def forward(self, attn: torch.Tensor, is_cross: bool, place: str) -> torch.Tensor:
        key = f"{place}_{'cross' if is_cross else 'self'}"
        if attn.shape[1] <= 32 ** 2:
            self.step_store[key].append(attn)
        if is_cross or self.cur_step < self.self_end:
            heads = attn.shape[0] // self.rows
            a = attn.reshape(self.rows, heads, *attn.shape[1:])
            base, rep = a[0], a[1:]
            if is_cross:
                alpha = 1.0 if self.cur_step < self.cross_end else 0.0
                new = torch.einsum("hpw,bwn->bhpn", base, self.mapper.to(base)) * alpha + (1 - alpha) * rep
                a[1:] = new
            elif attn.shape[1] <= 16 ** 2:
                a[1:] = base.unsqueeze(0).expand_as(rep)
            attn = a.reshape(self.rows * heads, *attn.shape[1:])
        return attn

    def between_steps(self) -> None:
        if not self.attention_store:
            self.attention_store = {k: list(v) for k, v in self.step_store.items()}
        else:
            for k in self.attention_store:
                for i in range(len(self.attention_store[k])):
                    self.attention_store[k][i] = self.attention_store[k][i] + self.step_store[k][i]
        self.step_store = defaultdict(list)


class ReferenceProcessor:
    """Materialises the attention probabilities of every row and passes them through the controller."""

    def __init__(self, controller: ReferenceReplaceController, place: str):
        self.controller = controller
        self.place = place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, attention_mask)
        probs = self.controller(probs, is_cross, self.place)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def install(unet, controller_factory) -> ReferenceReplaceController:
    names = list(unet.attn_processors.keys())
    controller = controller_factory(len(names))
    procs = {}
    for name in names:
        place = "mid" if name.startswith("mid_block") else "up" if name.startswith("up_blocks") else "down"
        procs[name] = ReferenceProcessor(controller, place)
    unet.set_attn_processor(procs)
    return controller


@torch.no_grad()
def sample(unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, latent: torch.Tensor, steps: int,
           cfg: float) -> torch.Tensor:
    """The reference's text2image loop: [uncond, cond] in one UNet call per step, DDIM."""
    scheduler.set_timesteps(steps)
    x = latent * scheduler.init_noise_sigma
    context = torch.cat([uncond.expand(cond.shape[0], -1, -1), cond])
    for t in scheduler.timesteps:
        eps = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample
        e_u, e_c = eps.chunk(2)
        x = scheduler.step(e_u + cfg * (e_c - e_u), t, x).prev_sample
    return x
