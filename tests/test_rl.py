"""rl.py: GRPO math against hand-written references, rewards, MR-SP vs naive loop, SP=2 == SP=1, exact resume,
the <|video_pad|> trap, clear errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import rl
from dist_utils import run_distributed
from common import sample_seed
from mrsp import EmbeddingCache, get_video_embeds, load_model, rollout, setup_mesh, sp_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

# one small RL run shared by the end-to-end, resume and SP tests. seed=1: on the random-init tiny model rewards are
# sparse (accuracy only by chance); with this seed steps 1 and 3 have groups with unequal rewards (dynamic sampling
# keeps them), so the updates are real -- the tests assert it (trained_groups > 0, weights moved).
RUN = ["--frames=16", "--prompts_per_step=2", "--group_size=4", "--max_new_tokens=16", "--lr=1e-4",
       "--dynamic_sampling=1", "--max_sample_rounds=8", "--ppo_epochs=2", "--seed=1", "--save_every=1", "--keep_checkpoints=3"]
COMPARE = ("reward_mean", "accuracy", "format_rate", "response_len", "loss", "grad_norm", "kl", "clip_frac",
           "ratio_mean", "entropy", "trained_groups", "dropped_groups", "sample_rounds")


def _rl(out_dir, tiny_ckpt, synth_dir, *args, nproc=1, check=True):
    base = [f"--model={tiny_ckpt}", f"--data={synth_dir}/train.jsonl", "--val_data=", f"--out_dir={out_dir}"]
    cmd = ([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    r = subprocess.run(cmd + ["rl.py"] + base + list(args), cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def _dcp_weights(ckpt, step_dir):
    """Model weights of a sharded DCP checkpoint written by sft.save_checkpoint, loaded without a process group."""
    import warnings
    import torch.distributed.checkpoint as dcp
    model, _ = load_model(ckpt)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "no process group: loading in a single process" -- intended
        dcp.load({"model": sd}, checkpoint_id=str(step_dir))
    return sd


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, tiny_ckpt, synth_dir):
    """3 uninterrupted steps, with held-out evaluation at the end."""
    out = tmp_path_factory.mktemp("rl_a")
    _rl(out, tiny_ckpt, synth_dir, *RUN, "--steps=3", f"--val_data={synth_dir}/val.jsonl", "--eval_every=3",
        "--eval_samples=2")
    return out


# ----------------------------------------------------------------------------- GRPO math
def _reference_loss(logp, old, ref, adv, mask, cl, ch, beta, agg):
    """Independent per-token loops; -> (loss, clip fraction, mean KL)."""
    B, T = logp.shape
    seq_sums, seq_lens, clipped, kls = [], [], 0, []
    for i in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[i, t]:
                continue
            rho = torch.exp(logp[i, t] - old[i, t])
            unclipped, clipped_obj = rho * adv[i], torch.clamp(rho, 1 - cl, 1 + ch) * adv[i]
            tok = -torch.min(unclipped, clipped_obj)
            clipped += bool(clipped_obj < unclipped)
            if ref is not None:
                d = ref[i, t] - logp[i, t]
                k3 = torch.exp(d) - d - 1
                kls.append(k3.item())
                tok = tok + beta * k3
            s, n = s + tok, n + 1
        seq_sums.append(s)
        seq_lens.append(n)
    if agg == "token-mean":
        loss = sum(seq_sums) / sum(seq_lens)
    elif agg == "seq-mean-token-mean":
        loss = sum(s / max(n, 1) for s, n in zip(seq_sums, seq_lens)) / B
    elif agg == "seq-mean-token-sum":
        loss = sum(seq_sums) / B
    else:                                              # seq-mean-token-sum-norm (Dr. GRPO)
        loss = sum(seq_sums) / (B * T)
    return loss, clipped / sum(seq_lens), (sum(kls) / len(kls) if kls else 0.0)


def _random_batch(B=4, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(B, T, generator=g)
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, :3] = True
    mask[2] = False                                    # an empty response (all masked)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("agg", rl.AGGS)
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("clip", [(0.1, 0.15), (10.0, 10.0)])
def test_grpo_loss_matches_hand_written_reference(agg, beta, clip):
    logp, old, ref, adv, mask = _random_batch()
    cl, ch = clip
    lp_ref = logp.clone().requires_grad_(True)
    want, want_clip, want_kl = _reference_loss(lp_ref, old, ref if beta else None, adv, mask, cl, ch, beta, agg)
    want.backward()
    # masked slots hold garbage (-inf): must not leak into the loss or the gradient
    lp = torch.where(mask, logp, -float("inf")).requires_grad_(True)
    loss, st = rl.grpo_loss(lp, old, ref if beta else None, adv, mask, clip_low=cl, clip_high=ch, kl_coef=beta,
                            agg=agg)
    loss.backward()
    assert abs(loss.item() - want.item()) <= 1e-6, (loss.item(), want.item())
    assert torch.allclose(lp.grad, lp_ref.grad, atol=1e-6) and torch.isfinite(lp.grad).all()
    assert (lp.grad[~mask] == 0).all()
    assert abs(st["clip_frac"].item() - want_clip) <= 1e-6 and int(st["tokens"]) == int(mask.sum())
    if beta:
        assert abs(st["kl"].item() - want_kl) <= 1e-6 and st["kl"].item() > 0
    if cl < 1:
        assert want_clip > 0.1          # the tight setting really clips
    else:
        assert want_clip == 0 and st["ratio_mean"].item() > 0


@pytest.mark.parametrize("agg", rl.AGGS)
def test_grpo_loss_global_normaliser_splits_exactly(agg):
    """One sequence at a time with the batch's global normaliser (what the trainer does over micro-batches and DP
    ranks) adds up to the whole-batch loss and gradient."""
    logp, old, ref, adv, mask = _random_batch(seed=1)
    kw = dict(clip_low=0.2, clip_high=0.3, kl_coef=0.05, agg=agg)
    whole_lp = logp.clone().requires_grad_(True)
    whole, _ = rl.grpo_loss(whole_lp, old, ref, adv, mask, **kw)
    whole.backward()
    B, T = logp.shape
    norm = dict(batch_num_tokens=mask.sum().item(), global_batch_size=B, loss_scale_factor=T)
    parts_lp = logp.clone().requires_grad_(True)
    total = 0.0
    for i in range(B):
        li, _ = rl.grpo_loss(parts_lp[i:i + 1], old[i:i + 1], ref[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                             **norm, **kw)
        li.backward()
        total += li.item()
    assert abs(total - whole.item()) <= 1e-6
    assert torch.allclose(parts_lp.grad, whole_lp.grad, atol=1e-7)


def test_grpo_loss_ratio_one_and_needs_ref_for_kl():
    logp, _, ref, adv, mask = _random_batch()
    lp = logp.clone().requires_grad_(True)
    loss, st = rl.grpo_loss(lp, logp, None, adv, mask)        # pi_old = pi_theta: ratio 1, nothing clipped
    assert st["ratio_mean"].item() == pytest.approx(1.0) and st["clip_frac"].item() == 0 and st["kl"].item() == 0
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logp"):
        rl.grpo_loss(lp, logp, None, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="agg='mean'"):
        rl.grpo_loss(lp, logp, ref, adv, mask, agg="mean")


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 1.0, 0.0, 0.1])
    a = rl.group_advantages(r, 4)
    for g in range(3):
        x = r[4 * g:4 * g + 4]
        want = (x - x.mean()) / (x.std() + 1e-6) if x.max() > x.min() else torch.zeros(4)
        assert torch.allclose(a[4 * g:4 * g + 4], want, atol=1e-6)
    # an all-equal group: exactly zero (0.1's float mean is not exactly 0.1: no 0/eps blow-up), never NaN
    five = rl.group_advantages([0.1] * 5 + [0.0] * 5 + [1.0] * 5, 5)
    assert torch.equal(five, torch.zeros(15))
    none = rl.group_advantages(r, 4, norm="none")                # Dr. GRPO: no std
    assert torch.allclose(none, (r.view(3, 4) - r.view(3, 4).mean(-1, keepdim=True)).view(-1).masked_fill(
        torch.arange(12).ge(4) & torch.arange(12).lt(8), 0.0), atol=1e-7)
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        rl.group_advantages(r, 5)


def test_reward_fn_table():
    opts = ["A. red", "B. green", "C. blue", "D. yellow"]
    table = [
        ("<think>the ball is blue</think><answer>C</answer>", 1.0, 1, 1),     # correct, well formatted
        ("<think>hmm</think>\n<answer>B</answer>", 0.1, 0, 1),                 # wrong but formatted
        ("The answer is C.", 0.9, 1, 0),                                       # correct without the format
        ("<answer>C</answer>", 0.9, 1, 0),                                     # no <think>: no format reward
        ("<think>x</think><answer>C</answer> trailing", 0.9, 1, 0),            # not a full match
        ("zq%% 7 --", 0.0, 0, 0),                                              # garbage
        ("<think>x</think><answer></answer>", 0.0, 0, 0),                     # the same parser reads the tag:
        ("<think>x</think><answer>B or C</answer>", 0.0, 0, 0),               # an empty or undecided tag is
        ("<think>x</think><answer>I cannot tell</answer>", 0.0, 0, 0),        # not the format
        ("<think>x</think><answer>**C**</answer>", 1.0, 1, 1),
        ("", 0.0, 0, 0),
    ]
    for text, total, acc, fmt in table:
        r = rl.reward_fn(text, "C", opts)
        assert (r["total"], r["accuracy"], r["format"]) == (pytest.approx(total), acc, fmt), text
    assert rl.reward_fn("<think>a</think><answer>C</answer>", "C", acc_weight=0.5, format_weight=0.5)["total"] == 1.0


def test_dynamic_sampling_keeps_groups_with_signal():
    g = lambda *t: dict(responses=[dict(total=x) for x in t])
    assert [rl.informative(x) for x in (g(0, 0, 0), g(0, 0.1, 0), g(1, 1), g(0.9, 1.0))] == [False, True, False, True]


def _balance_worker(cases):
    import torch.distributed as dist
    out = []
    for kept_n, drawn_n, per_rank in cases:
        drawn = [dict(i=i) for i in range(drawn_n)]
        kept, pad = rl.balance_groups(drawn[:kept_n[dist.get_rank()]], drawn, per_rank, dist.group.WORLD)
        out.append(([g["i"] for g in kept], [g["i"] for g in pad]))
    return out


def test_dp_ranks_train_equal_group_counts():
    """FSDP lockstep with dynamic sampling: rank 0 found 3 informative groups, rank 1 none -> both run 2 groups
    (the per-rank cap), rank 1 padding with dropped ones (trained at weight 0). Without dynamic sampling every group
    is kept and nothing is padded."""
    r0, r1 = run_distributed(_balance_worker, 2, args=([([3, 0], 6, 2), ([1, 0], 3, 2), ([2, 2], 2, 2)],))
    assert r0 == [([0, 1], []), ([0], []), ([0, 1], [])]
    assert r1 == [([], [0, 1]), ([], [0]), ([0, 1], [])]


# ----------------------------------------------------------------------------- the loop's pieces, in process
def _setup(monkeypatch, tiny_ckpt, **cfg):
    base = dict(frames=8, group_size=2, max_new_tokens=8, kl_coef=0.05, ppo_epochs=2, mini_batch=0, clip_low=0.2,
                clip_high=0.3, temperature=1.0, loop="mrsp", freeze_vision=True, seed=3, agg="token-mean")
    for k, v in dict(base, **cfg).items():
        monkeypatch.setattr(rl, k, v)
    rollout_model, processor = load_model(tiny_ckpt)
    return rollout_model.eval(), processor


def _collect(recs, positions, processor, rollout_model, cache, naive=False):
    """rl.py's step 1 (collect) for one prompt draw on one rank, with its own helpers: -> (videos, groups, vision
    passes). MR-SP: each video encoded once through the cache, G rollouts from the embeddings; naive: pixels, and
    every rollout request re-encodes its video."""
    tok, vid = processor.tokenizer, rollout_model.config.video_token_id
    if naive:
        videos, passes = [rl.load_pixels(r, processor) for r in recs], 0
    else:
        vals, passes = get_video_embeds(rollout_model, processor, recs, cache, num_frames=rl.frames)
        videos = [dict(v) for v in vals]
    prompts = [rl.prompt_of(r, processor, v) for r, v in zip(recs, videos)]
    seeds = [sample_seed(rl.seed, pos) for pos in positions]
    if naive:
        outs = [rl.naive_rollouts(rollout_model, None, p, v, s, tok, "cpu")[0]
                for p, v, s in zip(prompts, videos, seeds)]
        passes += rl.group_size * len(recs)
    else:
        outs = rollout([dict(p, embeds=v["embeds"]) for p, v in zip(prompts, videos)], rl.group_size, seeds,
                       rl.temperature, rl.max_new_tokens, tok, model=rollout_model)
    groups = [dict(rec=r, prompt=p, video=k, responses=[rl.finish_response(t, f, lp, r, tok, vid) for t, f, lp in o])
              for k, (r, p, o) in enumerate(zip(recs, prompts, outs))]
    return videos, groups, passes


def _ppo(policy, params, items, videos, adv, old, ref, mesh, from_cache, epochs, lr=1e-3, opt=None):
    """rl.py's step 4 with one mini-batch: `epochs` calls of rl.update -> their summed stats, updates."""
    opt = opt or torch.optim.AdamW(params, lr=lr)
    acc = None
    for epoch in range(epochs):
        st = rl.update(policy, opt, params, items, videos, adv, old, ref, mesh, from_cache, first_epoch=epoch == 0)
        acc = st if acc is None else {k: acc[k] + st[k] for k in acc}
    return dict(acc, updates=epochs)


def test_mrsp_and_naive_loop_give_the_same_loss(monkeypatch, tiny_ckpt, synth_dir):
    """Same rollouts -> the same old/ref log-probs, loss, gradient steps and weights whether the video comes from
    the cache (MR-SP) or is re-encoded from pixels inside every forward (--loop=naive), and whether the sequences run
    one per forward or in right-padded micro-batches (--micro_batch=3: runs of 3 and 1; 4 from pixels). Two PPO
    epochs, so ratios != 1."""
    from data import load_records
    rollout_model, processor = _setup(monkeypatch, tiny_ckpt)
    mesh = setup_mesh(1)
    recs = load_records(os.path.join(synth_dir, "train.jsonl"))[:2]
    videos, groups, passes = _collect(recs, [0, 1], processor, rollout_model, EmbeddingCache())
    assert passes == 2 and len(groups[0]["responses"]) == 2    # one encode per video for G rollouts
    for v, r in zip(videos, recs):
        v["pixel_values_videos"] = rl.load_pixels(r, processor)["pixel_values_videos"]
    # responses cut to different lengths (the random model runs to the budget): the micro-batches are padded
    resp = [(g, r, n) for g in groups for r, n in zip(g["responses"], (None, -2) if g is groups[0] else (-4, -6))]
    items = [rl.make_item(g["prompt"], r["tokens"][:n], g["video"], r["logprobs"][:n]) for g, r, n in resp]
    assert all(int(it["loss_mask"].sum()) == len(r["tokens"][:n]) > 0 for it, (g, r, n) in zip(items, resp))
    assert len({int(it["input_ids"].numel()) for it in items}) >= 3
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])     # the random model rarely earns a reward: fixed advantages
    res = {}
    for from_cache, mb in ((True, 1), (False, 1), (True, 3), (False, 4)):
        monkeypatch.setattr(rl, "micro_batch", mb)
        policy, _ = load_model(tiny_ckpt)
        policy.model.visual.requires_grad_(False)
        ref, _ = load_model(tiny_ckpt)
        params = [p for p in policy.parameters() if p.requires_grad]
        old = rl.prefill(policy, items, videos, mesh, from_cache)
        refs = rl.prefill(ref, items, videos, mesh, from_cache)
        acc = _ppo(policy, params, items, videos, adv, old, refs, mesh, from_cache, epochs=2)
        res[from_cache, mb] = (old, acc, {k: v.detach().clone() for k, v in policy.state_dict().items()})
    old1, acc1, w1 = res[True, 1]
    assert abs(acc1["loss"]) > 1e-4 and acc1["kl"] > 0                 # a real loss, the KL term active after epoch 1
    for key in ((False, 1), (True, 3), (False, 4)):
        old0, acc0, w0 = res[key]
        for a, b in zip(old1, old0):
            assert (a - b).abs().max() <= 1e-5, key
        for k in ("loss", "clip", "kl", "ratio", "ent", "grad_norm"):
            assert abs(acc1[k] - acc0[k]) <= 1e-5 * max(1.0, abs(acc1[k])), (key, k, acc1[k], acc0[k])
        diff = torch.cat([(w1[k] - w0[k]).abs().flatten() for k in w1])
        # Adam's first steps are g / |g| = +-lr per entry, so a padded batch's float reordering of a near-zero
        # gradient can move an entry by a fraction of lr (1e-3): the max within 5e-5, the mean (every entry) 1e-7
        assert diff.max() <= (1e-6 if key[1] == 1 else 5e-5) and diff.mean() <= 1e-7, key
    w_init = load_model(tiny_ckpt)[0].state_dict()
    assert max((w1[k] - w_init[k]).abs().max().item() for k in w1) > 1e-3
    # the engine's log-probs of the sampled tokens = the trainer's recompute (same temperature, fp32)
    assert acc1["gap"] / acc1["tokens0"] <= 1e-5


def test_padding_sequences_change_nothing(monkeypatch, tiny_ckpt, synth_dir):
    """A weight-0 padding group (DP lockstep) runs forward/backward but leaves loss, stats and the update unchanged."""
    from data import load_records
    rollout_model, processor = _setup(monkeypatch, tiny_ckpt, ppo_epochs=1)
    mesh = setup_mesh(1)
    recs = load_records(os.path.join(synth_dir, "train.jsonl"))[:2]
    videos, groups, _ = _collect(recs, [0, 1], processor, rollout_model, EmbeddingCache())
    real = [rl.make_item(groups[0]["prompt"], r["tokens"], 0, r["logprobs"]) for r in groups[0]["responses"]]
    pad = [rl.make_item(groups[1]["prompt"], r["tokens"], 1, r["logprobs"], weight=0.0) for r in groups[1]["responses"]]
    out = []
    for items, adv in ((real, torch.tensor([1.0, -0.5])), (real + pad, torch.tensor([1.0, -0.5, 0.0, 0.0]))):
        policy, _ = load_model(tiny_ckpt)
        policy.model.visual.requires_grad_(False)
        params = [p for p in policy.parameters() if p.requires_grad]
        old = rl.prefill(policy, items, videos, mesh, True)
        acc = _ppo(policy, params, items, videos, adv, old, old, mesh, True, epochs=1)
        out.append((acc, torch.cat([p.detach().flatten() for p in params])))
    (a, wa), (b, wb) = out
    assert abs(a["loss"]) > 1e-4 and all(abs(a[k] - b[k]) <= 1e-7 for k in ("loss", "tokens", "tokens0", "kl"))
    init = torch.cat([p.detach().flatten() for n, p in load_model(tiny_ckpt)[0].named_parameters()
                      if "visual" not in n])
    assert (wa - init).abs().max() > 1e-4 and (wa - wb).abs().max() <= 1e-7


def test_recompute_old_off_gives_the_same_update(monkeypatch, tiny_ckpt, synth_dir):
    """One update per batch: pi_old = pi_theta, so --recompute_old=0 (old=None: logp.detach()) gives the loss, ratio,
    gradient and weights of the old-policy prefill without running it (demo.sh uses it)."""
    from data import load_records
    rollout_model, processor = _setup(monkeypatch, tiny_ckpt, ppo_epochs=1, kl_coef=0.0)
    mesh = setup_mesh(1)
    recs = load_records(os.path.join(synth_dir, "train.jsonl"))[:2]
    videos, groups, _ = _collect(recs, [0, 1], processor, rollout_model, EmbeddingCache())
    items = [rl.make_item(g["prompt"], r["tokens"], g["video"], r["logprobs"]) for g in groups for r in g["responses"]]
    adv = torch.tensor([1.0, -0.3, 0.5, 0.2])      # not zero-sum: equal-length responses would give loss 0
    out = []
    for recompute in (True, False):
        policy, _ = load_model(tiny_ckpt)
        policy.model.visual.requires_grad_(False)
        params = [p for p in policy.parameters() if p.requires_grad]
        old = rl.prefill(policy, items, videos, mesh, True) if recompute else None
        acc = _ppo(policy, params, items, videos, adv, old, None, mesh, True, epochs=1)
        out.append((acc, torch.cat([p.detach().flatten() for p in params])))
    (a, wa), (b, wb) = out
    assert abs(a["loss"]) > 1e-4 and a["grad_norm"] > 0
    for k in ("loss", "ratio", "clip", "grad_norm", "tokens"):
        assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])), (k, a[k], b[k])
    assert (wa - wb).abs().max() <= 1e-7


def test_naive_rollouts_reencode_per_request_and_sample_the_same(monkeypatch, tiny_ckpt, synth_dir):
    """--loop=naive: G vision passes per prompt (one per rollout request) and G prefills, yet the same seed draws the
    same tokens as MR-SP (shared prefill, cached embeddings): the benchmark compares equal work apart from the video."""
    from data import load_records
    rollout_model, processor = _setup(monkeypatch, tiny_ckpt, group_size=3, max_new_tokens=12)
    recs = load_records(os.path.join(synth_dir, "train.jsonl"))[:2]
    _, g1, c1 = _collect(recs, [5, 6], processor, rollout_model, EmbeddingCache())
    videos0, g0, c0 = _collect(recs, [5, 6], processor, rollout_model, None, naive=True)
    assert c1 == 2 and c0 == 2 * 3
    assert "embeds" not in videos0[0] and "pixel_values_videos" in videos0[0]
    r1, r0 = [r for g in g1 for r in g["responses"]], [r for g in g0 for r in g["responses"]]
    assert [r["tokens"] for r in r1] == [r["tokens"] for r in r0]
    assert len({tuple(r["tokens"]) for r in r1}) == 6                      # sampled, all different
    assert max(abs(a - b) for x, y in zip(r1, r0) for a, b in zip(x["logprobs"], y["logprobs"])) <= 1e-5


def test_video_pad_in_a_response_is_cut_and_scored_zero(monkeypatch, tiny_ckpt, synth_dir):
    """A sampled <|video_pad|> would be counted as a video slot by every MR-SP forward: the response is cut before
    it, rewarded 0, and the kept prefix trains normally (an empty prefix included)."""
    from data import load_records
    rollout_model, processor = _setup(monkeypatch, tiny_ckpt)
    tok = processor.tokenizer
    vid, eos = rollout_model.config.video_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    rec = load_records(os.path.join(synth_dir, "train.jsonl"))[0]
    mesh = setup_mesh(1)
    videos, groups, _ = _collect([rec], [0], processor, rollout_model, EmbeddingCache())
    prompt = groups[0]["prompt"]
    good = tok(f"<think>x</think><answer>{rec['answer']}</answer>", add_special_tokens=False)["input_ids"] + [eos]
    bad = good[:3] + [vid] + good[3:]
    r_good = rl.finish_response(good, "stop", [0.0] * len(good), rec, tok, vid)
    r_bad = rl.finish_response(bad, "stop", [0.0] * len(bad), rec, tok, vid)
    r_first = rl.finish_response([vid] + good, "stop", [0.0] * (len(good) + 1), rec, tok, vid)
    assert r_good["total"] == pytest.approx(1.0) and not r_good["cut"]
    assert r_bad["cut"] and r_bad["tokens"] == good[:3] and r_bad["total"] == 0 and r_bad["finish"] == "video_pad"
    assert r_first["tokens"] == [] and r_first["total"] == 0
    policy, _ = load_model(tiny_ckpt)
    items = [rl.make_item(prompt, r["tokens"], 0, r["logprobs"]) for r in (r_bad, r_first, r_good)]
    n_video = int((prompt["input_ids"] == vid).sum())
    for it, n in zip(items, (3, 0, len(good))):
        assert int((it["input_ids"] == vid).sum()) == n_video and int(it["loss_mask"].sum()) == n
        assert int(it["mm_token_type_ids"][it["loss_mask"]].sum()) == 0
    lps = rl.prefill(policy, items, videos, mesh, True)
    assert [lp.numel() for lp in lps] == [3, 0, len(good)] and all(torch.isfinite(lp).all() for lp in lps)
    acc = _ppo(policy, list(policy.parameters()), items, videos, torch.tensor([1.0, -1.0, 0.5]), lps, lps, mesh, True,
               epochs=2, opt=torch.optim.SGD(policy.parameters(), lr=0.0))
    assert acc["updates"] == 2 and acc["tokens0"] == 3 + len(good)
    # without the cut the sequence has one video slot too many: the forward refuses it
    uncut = rl.make_item(prompt, bad, 0)
    with pytest.raises(ValueError, match="video_pad"):
        sp_logprobs(policy, dict(uncut, embeds=videos[0]["embeds"]))


# ----------------------------------------------------------------------------- the command line
def test_end_to_end_writes_metrics_checkpoints_and_export(run_a):
    m = _metrics(run_a)
    assert [r["step"] for r in m] == [1, 2, 3]
    want = {"reward_mean", "accuracy", "format_rate", "response_len", "kl", "clip_frac", "ratio_mean", "entropy",
            "loss", "grad_norm", "lr", "tokens_per_s", "t_encode", "t_rollout", "t_prefill", "t_train", "step_time",
            "vision_passes", "peak_mem_gb", "dropped_groups"}
    assert want <= set(m[0]) and {"val_acc", "val_format"} <= set(m[-1])
    assert m[0]["trained_groups"] > 0 and m[0]["grad_norm"] > 0 and m[0]["updates"] == 2   # a real update
    assert all(r["vision_passes"] == 2 * r["sample_rounds"] for r in m)   # 1 encode per new video, none per rollout
    assert m[0]["logp_gap"] < 1e-5                                        # engine and trainer agree (fp32)
    for r in m:   # the HF engine's rollout time splits into its prompt prefills and its token-by-token decode
        assert 0 < r["t_rollout_prefill"] and 0 < r["t_rollout_decode"]
        assert r["t_rollout_prefill"] + r["t_rollout_decode"] <= r["t_rollout"] + 1e-3
    cfg = json.load(open(run_a / "config.json"))
    assert cfg["group_size"] == 4 and cfg["loop"] == "mrsp" and cfg["clip_high"] == 0.3
    assert open(run_a / "latest").read() == "step_000003"
    model, processor = load_model(str(run_a / "hf"))
    assert processor.tokenizer.convert_tokens_to_ids("<|video_pad|>") == model.config.video_token_id


def test_resume_gives_the_same_next_step(tmp_path, run_a, tiny_ckpt, synth_dir):
    b = tmp_path / "b"
    common = [*RUN, "--steps=3", f"--val_data={synth_dir}/val.jsonl", "--eval_every=3", "--eval_samples=2"]
    _rl(b, tiny_ckpt, synth_dir, *common, "--stop_after=2")              # "killed" after step 2 (checkpointed)
    assert [r["step"] for r in _metrics(b)] == [1, 2] and not os.path.isdir(b / "hf")
    _rl(b, tiny_ckpt, synth_dir, *common, "--resume=1")
    ma, mb = _metrics(run_a), _metrics(b)
    assert [r["step"] for r in mb] == [1, 2, 3]
    assert ma[2]["trained_groups"] > 0 and ma[2]["sample_rounds"] > 1   # the resumed step trains, refills
    for ra, rb in zip(ma, mb):
        for k in COMPARE + ("val_acc",):
            assert (k in ra) == (k in rb) and abs(ra.get(k, 0) - rb.get(k, 0)) <= 1e-6, (ra["step"], k, ra, rb)
    from safetensors.torch import load_file
    wa, wb = load_file(run_a / "hf" / "model.safetensors"), load_file(b / "hf" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sp2_equals_sp1_after_one_step(tmp_path, run_a, tiny_ckpt, synth_dir):
    out = tmp_path / "sp2"
    _rl(out, tiny_ckpt, synth_dir, *RUN, "--steps=1", "--sp=2", nproc=2)
    m, ref = _metrics(out)[0], _metrics(run_a)[0]
    for k in COMPARE:
        assert abs(m[k] - ref[k]) <= 1e-5 * max(1.0, abs(ref[k])), (k, m[k], ref[k])
    assert m["vision_passes"] == ref["vision_passes"]                    # parallel encoding: each video once
    w2 = _dcp_weights(tiny_ckpt, out / "step_000001")
    w1 = _dcp_weights(tiny_ckpt, run_a / "step_000001")
    init = {k: v for k, v in load_model(tiny_ckpt)[0].state_dict().items()}
    assert max((w1[k] - init[k]).abs().max().item() for k in w1) > 5e-5  # the step really moved the weights
    # Adam's first updates are ~lr*sign(g): fp32 reduction-order noise can flip a few near-zero gradients
    diff = torch.cat([(w2[k] - w1[k]).abs().flatten() for k in w1])
    assert (diff <= 1e-6).float().mean() >= 0.999 and diff.max() <= 2 * 1e-4 + 1e-6


def test_dp2_and_dp2_sp2_equal_dp1_after_one_step(tmp_path, tiny_ckpt, synth_dir):
    """Data parallel (world 2, sp 1) and data x sequence parallel (world 4, sp 2) against one process: the same
    prompts and rollouts (sampling is seeded by data position), so the same rewards, loss, gradient norm and updated
    weights. 4 prompts x G=4 without dynamic sampling; seed 2 gives groups with unequal rewards at step 1, so the
    update is real (asserted)."""
    run = ["--frames=16", "--prompts_per_step=4", "--group_size=4", "--max_new_tokens=16", "--lr=1e-4", "--seed=2",
           "--steps=1", "--save_every=1"]
    res = {}
    for name, nproc, sp in (("dp1", 1, 1), ("dp2", 2, 1), ("dp2sp2", 4, 2)):
        out = tmp_path / name
        _rl(out, tiny_ckpt, synth_dir, *run, f"--sp={sp}", nproc=nproc)
        res[name] = (_metrics(out)[0], _dcp_weights(tiny_ckpt, out / "step_000001"))
    ref_m, ref_w = res["dp1"]
    init = {k: v for k, v in load_model(tiny_ckpt)[0].state_dict().items()}
    assert abs(ref_m["loss"]) > 1e-4 and max((ref_w[k] - init[k]).abs().max().item() for k in ref_w) > 5e-5
    for name in ("dp2", "dp2sp2"):
        m, w = res[name]
        for k in COMPARE:
            assert abs(m[k] - ref_m[k]) <= 1e-5 * max(1.0, abs(ref_m[k])), (name, k, m[k], ref_m[k])
        assert m["vision_passes"] == ref_m["vision_passes"], name       # each video encoded once in every layout
        # Adam's first update is ~lr*sign(g): reduction-order noise can flip a few near-zero gradients
        diff = torch.cat([(w[k] - ref_w[k]).abs().flatten() for k in ref_w])
        assert (diff <= 1e-6).float().mean() >= 0.999 and diff.max() <= 2 * 1e-4 + 1e-6, name


def test_naive_loop_command_line_equals_mrsp(tmp_path, run_a, tiny_ckpt, synth_dir):
    """--loop=naive end to end: same seed -> same rollouts, rewards, loss and update as MR-SP; every rollout, prefill and
    training forward runs the vision tower (MR-SP: one encode per video)."""
    out = tmp_path / "naive"
    _rl(out, tiny_ckpt, synth_dir, *RUN, "--steps=1", "--loop=naive")
    m, ref = _metrics(out)[0], _metrics(run_a)[0]
    for k in COMPARE:
        assert abs(m[k] - ref[k]) <= 1e-5 * max(1.0, abs(ref[k])), (k, m[k], ref[k])
    n_seq = 4 * m["trained_groups"]
    # G rollouts per drawn prompt + old and ref prefills + 2 PPO epochs of training forwards, per trained sequence
    assert m["vision_passes"] == 4 * 2 * m["sample_rounds"] + n_seq * (2 + 2)
    assert ref["vision_passes"] == 2 * ref["sample_rounds"]


def test_clear_errors(tmp_path, tiny_ckpt, synth_dir, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x1", "video": "gone.mp4", "question": "Q?", "options": ["a", "b"],
                               "answer": "A", "reasoning": "r"}) + "\n")
    r = _rl(tmp_path / "miss", tiny_ckpt, synth_dir, f"--data={bad}", check=False)
    assert r.returncode != 0 and f"record 'x1': {tmp_path}/gone.mp4: no such file" in r.stderr
    assert f"--data={bad}" in r.stderr
    r = _rl(tmp_path / "sp", tiny_ckpt, synth_dir, "--sp=2", check=False)
    assert r.returncode != 0 and "--sp=2 must be a positive divisor of the world size 1" in r.stderr
    for cfg, msg in ((dict(loop="naive", sp=2), "--loop=naive runs without sequence parallelism"),
                     (dict(agg="mean"), "--agg=mean: expected one of"),
                     (dict(group_size=1), "--group_size=1: GRPO needs at least 2"),
                     (dict(engine="sglang"), "--engine=sglang")):
        with monkeypatch.context() as mp:
            for k, v in cfg.items():
                mp.setattr(rl, k, v)
            with pytest.raises(SystemExit, match=msg.replace("(", r"\(").replace(")", r"\)")):
                rl.check_config()
