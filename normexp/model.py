"""A decoder-only GPT whose norm and placement are config switches (Flax NNX).

Shape letters: B batch, T time (sequence), N = B*T tokens, C model width, H heads, K head
width (C / H), F MLP hidden width, V vocabulary, L blocks. Activations flow as 2-D [N, C] so
every projection is a plain 2-D matmul and weight gradients need no transposing copies on CPU.

The blocks' parameters are stacked on a leading L axis (one `Block` module created with
`nnx.vmap`) and applied with `jax.lax.scan`, so compile time does not grow with depth;
`model.scan: false` applies the same stacked parameters in a Python loop, for debugging.

The model computes no statistics of itself: called with `observe`, each block hands what it
saw (its output stream and its sublayer norms' outputs) to that function, inside the scan, and
the results come back stacked per block (normexp.metrics turns them into statistics).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from normexp import custom_grads, hardware
from normexp.norms import NORMS, make_norm
from normexp.norms import modules as norm_modules
from normexp.placement import PLACEMENTS, Depth
from normexp.weights import (DECAYED, Scaling, kernel_std, linear_maker, normal_init, on_sphere,
                             unit)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Up to this depth the scan is unrolled by default: inside an XLA:CPU while loop every saved
# activation is a stacked buffer that is zero-filled and sliced each step (~15% step time at 4
# blocks), while compiling 8 unrolled blocks still takes only ~2 s.
AUTO_UNROLL_MAX = 8
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def norm_maker(cfg, *, rows_per_seq, dtype, custom_grad, rngs):
    """(dim, role, rows_per_seq=...) -> a norm of kind `cfg.kind` (cfg: `model.norm`)."""
    def make(dim, role, rows=rows_per_seq):
        return make_norm(cfg, dim, role=role, dtype=dtype, rows_per_seq=rows,
                         custom_grad=custom_grad, rngs=rngs)
    return make


class Attention(nnx.Module):
    """Causal multi-head self-attention on [N, C] activations.

    Options a placement or switch adds: norms on queries and keys (`qk_norm`: per head, or
    shared by the heads over the full width), nGPT's unit-norm queries and keys (`sphere`),
    full-width norms on q, k and v (`qkv_norm`, HybridNorm), a learned per-head output scale
    (`head_scale`, NormFormer).
    """

    def __init__(self, d_model, n_head, *, linear, norm, init, std, out_std, gain, qkv_norm,
                 qk_norm, head_scale, rows_per_seq, kernel, custom_grad, softcap=0.0,
                 sphere=False):
        C, H = d_model, n_head
        # soft-capping needs the logits: only the einsum core with autodiff has them
        self.n_head, self.kernel = H, kernel
        self.core = (custom_grads.causal_attention if custom_grad and not softcap
                     else functools.partial(custom_grads.causal_attention_plain,
                                            softcap=softcap))
        # q, k and v are three C x C projections, whose fans Glorot's rule takes; nGPT keeps
        # every kernel unit-norm along the model width
        self.qkv = linear(C, 3 * C, normal_init(kernel_std(init, C, C, std), gain,
                                                from_column=2 * C), -2 if sphere else None)
        self.proj = linear(C, C, normal_init(kernel_std(init, C, C, out_std) * gain),
                           -1 if sphere else None)
        self.s_qk = Scaling((H, C // H), 1.0, C ** -0.5) if sphere else None
        if qkv_norm:
            self.q_norm, self.k_norm, self.v_norm = (norm(C, "attn") for _ in range(3))
        else:
            self.q_norm = self.k_norm = self.v_norm = None
        # qk_norm per_head: rows are (token, head) pairs, H of them per token; shared: tokens
        width, rows = (C // H, rows_per_seq * H) if qk_norm == "per_head" else (C, rows_per_seq)
        self.qk_width = width
        self.q_head_norm, self.k_head_norm = ((norm(width, "attn", rows) for _ in range(2))
                                              if qk_norm != "off" else (None, None))
        self.head_scale = nnx.Param(jnp.ones((H,), jnp.float32)) if head_scale else None

    def __call__(self, x_NxC, seq_len, seen=None):
        """The attention output; with `seen` (a dict) it also keeps the queries and keys the
        logits are made of, `attn_q` and `attn_k` ([B, T, H, K], after any norm), and its
        linear layers' outputs in `seen["linear"]`: `q`, `k`, `v` (before any norm), `proj`."""
        N, C = x_NxC.shape
        T, H = seq_len, self.n_head
        B, K = N // T, C // H
        q_NxC, k_NxC, v_NxC = jnp.split(self.qkv(x_NxC), 3, axis=-1)
        if seen is not None:
            seen.setdefault("linear", {}).update(q=q_NxC, k=k_NxC, v=v_NxC)
        if self.q_norm is not None:
            q_NxC, k_NxC, v_NxC = self.q_norm(q_NxC), self.k_norm(k_NxC), self.v_norm(v_NxC)
        if self.q_head_norm is not None:
            rows = N * C // self.qk_width
            q_NxC = self.q_head_norm(q_NxC.reshape(rows, self.qk_width)).reshape(N, C)
            k_NxC = self.k_head_norm(k_NxC.reshape(rows, self.qk_width)).reshape(N, C)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (a.reshape(B, T, H, K) for a in (q_NxC, k_NxC, v_NxC))
        if self.s_qk is not None:  # nGPT: logits sqrt(K) * s_qk^2 . (unit q * unit k): q carries
            s_HxK = self.s_qk().astype(q_BxTxHxK.dtype)  # K, as the core divides by sqrt(K)
            q_BxTxHxK = unit(q_BxTxHxK) * (s_HxK * K)
            k_BxTxHxK = unit(k_BxTxHxK) * s_HxK
        if seen is not None:
            seen["attn_q"], seen["attn_k"] = q_BxTxHxK, k_BxTxHxK
        if self.kernel == "splash":  # TPUs
            y_BxTxHxK = hardware.splash_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK)
        elif self.kernel != "einsum":  # cudnn (fused flash attention) or xla
            y_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK,
                                                     is_causal=True, implementation=self.kernel)
        else:  # head-major [B, H, T, K] keeps the two attention matmuls batched over (B, H)
            y_BxHxTxK = self.core(*(a.transpose(0, 2, 1, 3)
                                    for a in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK)))
            y_BxTxHxK = y_BxHxTxK.transpose(0, 2, 1, 3)
        if self.head_scale is not None:
            y_BxTxHxK = y_BxTxHxK * self.head_scale[...].astype(y_BxTxHxK.dtype)[:, None]
        y_NxC = self.proj(y_BxTxHxK.reshape(N, C))
        if seen is not None:
            seen["linear"]["proj"] = y_NxC
        return y_NxC


class MLP(nnx.Module):
    """Two-layer perceptron W2 act(W1 x), act exact GELU or ReLU (`activation`), optionally
    W2 N(act(W1 x)); nGPT (`sphere`): W2 act(s_u * sqrt(C) * W1 x) with unit-norm kernels."""

    def __init__(self, d_model, hidden, *, linear, norm, init, std, out_std, gain, mid_norm,
                 custom_grad, sphere=False, activation="gelu"):
        C, F = d_model, hidden
        if activation == "relu":
            self.act = jax.nn.relu
        else:
            self.act = custom_grads.gelu if custom_grad else functools.partial(
                jax.nn.gelu, approximate=False)
        self.up = linear(C, F, normal_init(kernel_std(init, C, F, std) * gain),
                         -2 if sphere else None)
        self.down = linear(F, C, normal_init(kernel_std(init, F, C, out_std) * gain),
                           -1 if sphere else None)
        self.mid_norm = norm(F, "mlp") if mid_norm else None
        # nGPT: W1 x are cosines of size ~1/sqrt(C); sqrt(C) brings them to GELU's range
        self.s_u, self.width_scale = (Scaling((F,), 1.0, 1.0), math.sqrt(C)) if sphere else (
            None, 1.0)

    def __call__(self, x_NxC, seen=None):
        """W2 act(W1 x); with `seen`, it keeps `up` (W1 x) and `down` in `seen["linear"]`."""
        u_NxF = self.up(x_NxC)
        if seen is not None:
            seen.setdefault("linear", {})["up"] = u_NxF
        if self.s_u is not None:
            u_NxF = u_NxF * (self.s_u() * self.width_scale).astype(u_NxF.dtype)
        h_NxF = self.act(u_NxF)
        if self.mid_norm is not None:
            h_NxF = self.mid_norm(h_NxF)
        y_NxC = self.down(h_NxF)
        if seen is not None:
            seen["linear"]["down"] = y_NxC
        return y_NxC


class Gate(nnx.Module):
    """ReZero's residual gate: a * y, a learned scalar initialised to 0."""

    def __init__(self):
        self.a = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, y):
        return self.a[...].astype(y.dtype) * y


class SublayerNorms(nnx.Module):
    """The norms a placement rule uses around one sublayer: `input`, `output`, `gate`, and
    nGPT's eigen learning rates `eigen` (alpha, init 0.05, scale 1/sqrt(C) as in the paper)."""

    def __init__(self, names, make, d_model):
        self.input = make() if "input" in names else None
        self.output = make() if "output" in names else None
        self.gate = Gate() if "gate" in names else None
        self.eigen = Scaling((d_model,), 0.05, d_model ** -0.5) if "eigen" in names else None


class RecordedNorms:
    """A sublayer's norms as its placement rule sees them, each output kept in `seen` under
    `<sublayer>_input_norm` or `<sublayer>_output_norm` (the norm's slot, not its position:
    Pre-Norm's input norm gives N(x), Post-Norm's output norm N(x + F(x))); a squashing norm
    (DyT, Derf) also keeps its input and its alpha and shift under `<slot name>_squash`."""

    def __init__(self, norms, sublayer, seen):
        self.gate, self.eigen = norms.gate, norms.eigen
        self.input = self._keep(norms.input, f"{sublayer}_input_norm", seen)
        self.output = self._keep(norms.output, f"{sublayer}_output_norm", seen)

    @staticmethod
    def _keep(norm, name, seen):
        if norm is None:
            return None

        def call(x):
            seen[name] = y = norm(x)
            if norm.squashes:  # its input and (alpha, shift)
                seen[f"{name}_squash"] = dict(zip(("alpha", "shift"), norm.squash_params()), x=x)
            return y
        return call


class Block(nnx.Module):
    """One transformer block: attention then MLP, each wrapped by its placement rule."""

    def __init__(self, d_model, n_head, mlp_ratio, *, place, n_layer, linear, norm, init, std,
                 out_std, qk_norm, rows_per_seq, attention, custom_grad, attn_softcap=0.0,
                 activation="gelu"):
        self.place = place
        gain = place.init_gain(n_layer) if place.init_gain else 1.0
        shared = dict(linear=linear, norm=norm, init=init, std=std, out_std=out_std, gain=gain,
                      custom_grad=custom_grad, sphere=place.sphere)
        self.attn_norms = SublayerNorms(place.attn.norms, lambda: norm(d_model, "attn"), d_model)
        self.attn = Attention(d_model, n_head, qkv_norm=place.qkv_norm, qk_norm=qk_norm,
                              head_scale=place.head_scale, rows_per_seq=rows_per_seq,
                              kernel=attention, softcap=attn_softcap, **shared)
        self.mlp_norms = SublayerNorms(place.mlp.norms, lambda: norm(d_model, "mlp"), d_model)
        self.mlp = MLP(d_model, mlp_ratio * d_model, mid_norm=place.mid_norm,
                       activation=activation, **shared)

    def __call__(self, stream, seq_len, depth, observe=None):
        """The block's output stream; with `observe` also `observe(seen)`: the stream entering
        each sublayer's rule (`attn_in`, `mlp_in`) and leaving the block (`stream`; ResiDual's
        x stream), each sublayer norm's output (RecordedNorms), `attn_q`, `attn_k`, `linear`."""
        if observe is None:
            attn = lambda h: self.attn(h, seq_len)
            return self.place.mlp(self.place.attn(stream, attn, self.attn_norms, depth),
                                  self.mlp, self.mlp_norms, depth)
        x = lambda s: s[0] if isinstance(s, tuple) else s
        seen = {"attn_in": x(stream)}
        stream = self.place.attn(stream, lambda h: self.attn(h, seq_len, seen),
                                 RecordedNorms(self.attn_norms, "attn", seen), depth)
        seen["mlp_in"] = x(stream)
        stream = self.place.mlp(stream, lambda h: self.mlp(h, seen),
                                RecordedNorms(self.mlp_norms, "mlp", seen), depth)
        seen["stream"] = x(stream)
        return stream, observe(seen)


class GPT(nnx.Module):
    """Token + learned position embeddings (optionally normalized), n_layer blocks, optional
    final norm, tied head."""

    def __init__(self, cfg, *, vocab_size, max_len, kernels, remat=None, rngs):
        """kernels: what normexp.hardware chose for the device, `model_choices`'s
        {"attention": Choice, "custom_grads": Choice}, resolved once by the caller."""
        std, L, C = cfg.init_std, cfg.n_layer, cfg.d_model
        place = PLACEMENTS[cfg.placement]
        # GPT-2's 1/sqrt(2L) residual init; DeepNet replaces it with its own gain (in Block)
        scaled = cfg.scale_residual_init and place.init_gain is None
        out_std = std / math.sqrt(2 * L) if scaled else std
        dtype = DTYPES[cfg.dtype]
        self.dtype, self.max_len, self.dual = dtype, max_len, place.dual
        self.scan, self.remat, self.n_layer = cfg.scan, remat, L
        self.norm_kind, self.logit_softcap = cfg.norm.kind, cfg.logit_softcap
        self.segments = place.segments(L, cfg) if place.segments else (0, L)
        # remat only saves memory between the iterations of a real loop
        shallow = L <= AUTO_UNROLL_MAX and remat is None
        self.unroll = cfg.scan_unroll or (L if shallow else 1)
        attention, custom_grad = kernels["attention"].value, kernels["custom_grads"].value
        weight_norm = cfg.weight_norm or NORMS[cfg.norm.kind].weight_normalized_kernels

        def makers(rngs):  # the linear layers and norms made from these rngs
            return dict(
                linear=linear_maker(weight_norm=weight_norm, bias=cfg.bias, dtype=dtype,
                                    custom_grad=custom_grad, rngs=rngs),
                norm=norm_maker(cfg.norm, rows_per_seq=max_len, dtype=dtype,
                                custom_grad=custom_grad, rngs=rngs))

        norm = makers(rngs)["norm"]
        # xavier: the Transformer's embeddings, N(0, 1/C) scaled by sqrt(C) at the input, so the
        # first block sees unit-scale tokens as in Xiong et al.'s analysis
        embed_std = C ** -0.5 if cfg.init == "xavier" else std
        self.embed_scale = math.sqrt(C) if cfg.init == "xavier" else 1.0
        self.tok_embed = nnx.Embed(vocab_size, C, dtype=self.dtype, rngs=rngs,
                                   embedding_init=nnx.initializers.normal(embed_std),
                                   embedding_metadata=DECAYED)
        self.pos_embed = nnx.Param(embed_std * jax.random.normal(rngs.params(), (max_len, C)),
                                   **DECAYED)
        self.embed_norm = norm(C, "final") if cfg.embed_norm or place.embed_norm else None
        self.sphere = place.sphere
        if place.sphere:  # nGPT: unit-norm embeddings (tied: the output's too), scaled logits
            self.tok_embed.embedding = on_sphere(self.tok_embed.embedding[...], -1)
            self.pos_embed = on_sphere(self.pos_embed[...], -1)
        self.logit_scale = Scaling((vocab_size,), 1.0, C ** -0.5) if place.sphere else None

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs):
            return Block(C, cfg.n_head, cfg.mlp_ratio, place=place, n_layer=L, init=cfg.init,
                         std=std, out_std=out_std, qk_norm=cfg.qk_norm, rows_per_seq=max_len,
                         attention=attention, custom_grad=custom_grad,
                         attn_softcap=cfg.attn_softcap, activation=cfg.activation,
                         **makers(rngs))

        self.blocks = stacked_blocks(rngs)  # every parameter has a leading [L] axis
        self.dual_norm = norm(C, "final") if place.dual else None
        self.final_norm = norm(C, "final") if cfg.final_norm else None
        self.whole_sequences = any(n.batch_statistics or n.leaks_across_positions
                                   for n in norm_modules(self))

    def features(self, tokens_BxT, observe=None, skip=None):
        """The residual stream after the last block (and final norm), as [N, C]; with `observe`
        also what it returned for each block, stacked on a leading [L] axis (see `Block`).
        `skip`: a block index (may be traced) whose input passes on unchanged (layer pruning)."""
        B, T = tokens_BxT.shape
        if self.whole_sequences and T != self.max_len:
            raise ValueError(f"norm kind {self.norm_kind!r} pools over sequences of "
                             f"{self.max_len} tokens; got {T}")
        x_BxTxC = self.tok_embed(tokens_BxT) + self.pos_embed[:T].astype(self.dtype)
        if self.embed_scale != 1.0:
            x_BxTxC = x_BxTxC * self.embed_scale
        x_NxC = x_BxTxC.reshape(B * T, -1)
        if self.embed_norm is not None:
            x_NxC = self.embed_norm(x_NxC)
        if self.sphere:
            x_NxC = unit(x_NxC)
        stream, observed = self._apply_blocks((x_NxC, x_NxC) if self.dual else x_NxC, T,
                                              observe, skip)
        # ResiDual's output: x_L + N(d_L)
        x_NxC = stream[0] + self.dual_norm(stream[1]) if self.dual else stream
        if self.final_norm is not None:
            x_NxC = self.final_norm(x_NxC)
        return x_NxC if observe is None else (x_NxC, observed)

    def _apply_blocks(self, stream, seq_len, observe=None, skip=None):
        graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
        L, bounds, index_L = self.n_layer, self.segments, jnp.arange(self.n_layer, dtype=jnp.int32)
        rests, observed = [], []
        for segment, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            if start == stop:
                continue

            def one_block(stream, params, rest, index, segment=segment):
                block = nnx.merge(graphdef, params, rest)
                out = block(stream, seq_len, Depth(index, L, segment), observe)
                new, seen = out if observe is not None else (out, {})
                stream = new if skip is None else jax.tree.map(
                    lambda a, b: jnp.where(index == skip, a, b), stream, new)
                # the block's new non-parameter state (e.g. running statistics) and statistics
                return stream, (nnx.state(block, nnx.Not(nnx.Param)), seen)

            if self.remat is not None:
                one_block = jax.checkpoint(one_block, policy=REMAT_POLICIES[self.remat])
            run = lambda tree: jax.tree.map(lambda a: a[start:stop], tree)
            if self.scan:
                stream, (rest_run, seen_run) = jax.lax.scan(
                    lambda s, xs: one_block(s, *xs), stream,
                    (run(params), run(rest), index_L[start:stop]),
                    unroll=min(self.unroll, stop - start))
                rests.append(rest_run)
                observed.append(seen_run)
            else:
                for i in range(start, stop):
                    layer = lambda tree: jax.tree.map(lambda a: a[i], tree)
                    stream, (rest_i, seen_i) = one_block(stream, layer(params), layer(rest),
                                                         index_L[i])
                    rests.append(jax.tree.map(lambda a: a[None], rest_i))
                    observed.append(jax.tree.map(lambda a: a[None], seen_i))
        rest, observed = (jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
                          if len(parts) > 1 else parts[0] for parts in (rests, observed))
        nnx.update(self.blocks, rest)
        return stream, observed

    def __call__(self, tokens_BxT, observe=None, skip=None):
        """Logits [N, V] through the tied output embedding, soft-capped with `logit_softcap`
        c > 0 as c * tanh(z / c) (and, with `observe`, what it returned for each block)."""
        out = self.features(tokens_BxT, observe, skip)
        x_NxC, observed = out if observe is not None else (out, None)
        logits_NxV = self.tok_embed.attend(x_NxC)
        if self.logit_scale is not None:  # nGPT's s_z
            logits_NxV = logits_NxV * self.logit_scale().astype(logits_NxV.dtype)
        if self.logit_softcap:
            logits_NxV = self.logit_softcap * jnp.tanh(logits_NxV / self.logit_softcap)
        return logits_NxV if observe is None else (logits_NxV, observed)


def norm_report(model):
    """What the model's norms do across positions and sequences, for logs and summary.json."""
    found = norm_modules(model)
    return {"leaks_across_positions": any(n.leaks_across_positions for n in found),
            "batch_statistics": any(n.batch_statistics for n in found)}


def evaluation_view(model):
    """The model as evaluated: batch-statistics norms use their running averages."""
    return nnx.view(model, use_running_average=True, raise_if_not_found=False)


def make_model(cfg, *, vocab_size, max_len, seed, remat=None, kernels=None):
    """kernels: the hardware choices a run made (`hardware.model_choices`); by default this
    device's, resolved here."""
    return GPT(cfg, vocab_size=vocab_size, max_len=max_len, remat=remat,
               kernels=kernels or hardware.model_choices(cfg, max_len),
               rngs=nnx.Rngs(params=seed))
