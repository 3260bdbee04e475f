"""An independent float64 NumPy forward pass of the decoder, written from PAPER.md, for tests only.

It shares nothing with model/ but the parameter tree's names, so a bug in the JAX code cannot hide in both.
"""

import math

import numpy as np


def _norm(x, p, config):
    if config.norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    y = x / np.sqrt((x**2).mean(-1, keepdims=True) + config.norm_eps) * p["scale"]
    return y + p["bias"] if "bias" in p else y


def _rope(x, base):  # x [T, h, Q], positions 0..T-1, rotate-half convention
    T, _, Q = x.shape
    inv = 1.0 / base ** (np.arange(Q // 2) / (Q // 2))
    ang = np.arange(T)[:, None] * inv[None]  # [T, Q/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., : Q // 2], x[..., Q // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def forward(params, config, tokens):
    """tokens: list[int] (one sequence) -> float64 logits [T, V]."""
    p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
    T = len(tokens)
    x = p["embed"][np.asarray(tokens)]
    H, K, Q = config.n_heads, config.n_kv_heads, config.d_head
    causal = np.tril(np.ones((T, T), bool))
    for i in range(config.n_layers):
        lp = {k[len("layers/") :]: v[i] for k, v in p.items() if k.startswith("layers/")}
        sub = lambda prefix, lp=lp: {k.split("/")[1]: v for k, v in lp.items() if k.startswith(prefix + "/")}

        def attn(h, lp=lp):
            q = np.einsum("te,ehq->thq", h, lp["wq"]) + lp.get("bq", 0)
            k = np.einsum("te,ekq->tkq", h, lp["wk"]) + lp.get("bk", 0)
            v = np.einsum("te,ekq->tkq", h, lp["wv"]) + lp.get("bv", 0)
            q, k = _rope(q, config.rope_base), _rope(k, config.rope_base)
            out = np.zeros((T, H, Q))
            for head in range(H):
                kv = head // (H // K)  # heads [g*G, (g+1)*G) share kv head g
                s = q[:, head] @ k[:, kv].T / math.sqrt(Q)
                s = np.where(causal, s, -np.inf)
                w = np.exp(s - s.max(-1, keepdims=True))
                out[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, kv]
            return np.einsum("thq,hqe->te", out, lp["wo"]) + lp.get("bo", 0)

        def mlp(h, lp=lp):
            up = h @ lp["w_up"] + lp.get("b_up", 0)
            if config.mlp == "swiglu":
                g = h @ lp["w_gate"] + lp.get("b_gate", 0)
                act = g / (1 + np.exp(-g)) * up
            else:
                act = _gelu(up)
            return act @ lp["w_down"] + lp.get("b_down", 0)

        if config.parallel_block:
            h = _norm(x, sub("attn_norm"), config)
            x = x + attn(h) + mlp(h)
        else:
            x = x + attn(_norm(x, sub("attn_norm"), config))
            x = x + mlp(_norm(x, sub("mlp_norm"), config))
    h = _norm(x, {k.split("/")[1]: v for k, v in p.items() if k.startswith("final_norm/")}, config)
    return h @ (p["unembed"] if "unembed" in p else p["embed"].T)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
