"""Planted critical sets beyond the Llama demo construction (achilles_guard.engine.demo.plant_massive).

`plant_gpt2` mirrors the demo's always-on massive activation in GPT-2 (Conv1D, LayerNorm):

1. every token embedding carries a constant channel (wte = 1, wpe = 0 on it);
2. one `mlp.c_fc` unit of block `plant.layer` reads it and, through `mlp.c_proj`, writes `massive`
   onto `plant.channels` of the residual stream at every token;
3. every later LayerNorm has weight `gain` (0 on the massive channels) to absorb their RMS.

LayerNorm subtracts the mean, unlike RMSNorm: with k massive channels present every other channel
of a later norm's output is shifted by about -gain * sqrt(k/d), a shift that changes when a proper
subset is masked and would make subsets matter. So the construction also makes every projection
that reads a later norm (`attn.c_attn`, `mlp.c_fc`, `lm_head`) blind to that constant direction:
its input weights over the non-massive channels sum to zero.
"""

from __future__ import annotations

import torch

from achilles_guard.engine.demo import Plant
from achilles_guard.engine.neurons import Neuron

__all__ = ["plant_gpt2"]


def plant_gpt2(model, plant: Plant) -> set[Neuron]:
    """Plant `plant` into a GPT2LMHeadModel (untied lm_head) in place; return the critical set."""
    blocks = model.transformer.h
    d = model.config.n_embd
    massive = list(plant.channels)
    keep = torch.ones(d, dtype=torch.bool)
    keep[massive] = False
    with torch.no_grad():
        model.transformer.wte.weight[:, plant.const_channel] = 1.0
        model.transformer.wpe.weight[:, plant.const_channel] = 0.0
        mlp = blocks[plant.layer].mlp
        # Conv1D weights are (in, out): c_fc column `unit` reads, c_proj row `unit` writes.
        mlp.c_fc.weight[:, plant.unit] = 0.0
        mlp.c_fc.weight[plant.const_channel, plant.unit] = plant.gain
        mlp.c_fc.bias[plant.unit] = 0.0
        # LayerNorm of a token whose only large channel is the constant 1: x_hat ~ sqrt(d)
        pre = plant.gain * d**0.5
        act = float(mlp.act(torch.tensor([pre])))  # gelu_new(pre) ~ pre
        mlp.c_proj.weight[plant.unit, :] = 0.0
        mlp.c_proj.weight[plant.unit, massive] = plant.massive / act
        gain = plant.massive / d**0.5
        norms = [n for block in blocks[plant.layer + 1 :] for n in (block.ln_1, block.ln_2)]
        for norm in [*norms, model.transformer.ln_f]:
            norm.weight.fill_(gain)
            norm.weight[massive] = 0.0
            norm.bias.zero_()
        readers = [w for block in blocks[plant.layer + 1 :] for w in (block.attn.c_attn.weight, block.mlp.c_fc.weight)]
        for weight in readers:  # (d, out): remove the mean over the non-massive input rows
            weight[keep] -= weight[keep].mean(dim=0, keepdim=True)
        head = model.lm_head.weight  # (V, d)
        head[:, keep] -= head[:, keep].mean(dim=1, keepdim=True)
    prefix = "transformer.h"
    return {Neuron(f"{prefix}.{plant.layer}.mlp.c_proj", c) for c in plant.channels}
