"""Generation with a KV cache: greedy output equals transformers' generate(do_sample=False) on tiny
random dense and MoE models (prompts of different lengths in one batch), log-probs equal its
scores, sampling follows the model's distribution and repeats for a seed, bad requests fail in one
line."""

import jax.numpy as jnp
import numpy as np
import pytest

import ernie_jax
from ernie_jax.errors import ConfigError
from ernie_jax.generation.sampling import truncated_logits
from tests.hf_reference import make_hf_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

EOS = 2


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, len(prompt) :].numpy()
    logp = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
    return new, np.array(logp)


@pytest.mark.parametrize("moe", [True, False], ids=["moe", "dense"])
def test_greedy_equals_transformers_in_one_batch(tmp_path, moe):
    # MoE: dense layers between MoE layers and after them (stacks of one layer), decoded with the
    # layers scanned and one by one; dense: a tied head
    shape = dict(layers=5, interval=2, tie=False) if moe else dict(layers=3, tie=True)
    hf, path = make_hf_model(tmp_path, moe=moe, bias_scale=0.3 if moe else 0.0, **shape)
    ours = ernie_jax.load_pretrained(path)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, 97, n)) for n in (9, 4, 13)]
    run = lambda unroll: ernie_jax.generate(
        ours, prompts, max_new_tokens=12, temperature=0.0, eos_token_ids=[EOS], unroll_layers=unroll
    )
    got = run(None)  # CPU: the layers one by one
    if moe:  # the scanned stacks of GPU / TPU decode give the same tokens
        scanned = run(False)
        np.testing.assert_array_equal(scanned.tokens, got.tokens)
        np.testing.assert_allclose(scanned.logprobs, got.logprobs, atol=1e-6)
    for i, p in enumerate(prompts):
        ref, ref_logp = _hf_greedy(hf, p, 12)
        n = len(ref)
        assert got.lengths[i] == n
        np.testing.assert_array_equal(got.tokens[i, :n], ref)
        np.testing.assert_allclose(got.logprobs[i, :n], ref_logp, atol=1e-4)
        assert (got.tokens[i, n:] == 0).all() and (got.logprobs[i, n:] == 0).all()


def test_sampling_follows_the_model_and_repeats_for_a_seed(tmp_path):
    _, path = make_hf_model(tmp_path, moe=True, layers=2, vocab=32)
    model = ernie_jax.load_pretrained(path)
    prompt = np.tile(np.array([[5, 17, 30, 8]], np.int32), (4096, 1))
    a = ernie_jax.generate(model, prompt, max_new_tokens=2, temperature=0.5, seed=3)
    b = ernie_jax.generate(model, prompt, max_new_tokens=2, temperature=0.5, seed=3)
    c = ernie_jax.generate(model, prompt[:64], max_new_tokens=2, temperature=0.5, seed=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens[:64], c.tokens)
    # the first token's empirical distribution is softmax(logits / temperature), not softmax(logits)
    logits = np.asarray(model(jnp.asarray(prompt[:1])).logits[0, -1], np.float64)
    soft = lambda z: np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    seen = np.bincount(a.tokens[:, 0], minlength=logits.size) / len(prompt)
    tv = lambda p, q: 0.5 * np.abs(p - q).sum()
    assert tv(seen, soft(logits / 0.5)) < 0.1 < tv(seen, soft(logits))
    # the reported log-prob is the model's own (temperature 1)
    np.testing.assert_allclose(a.logprobs[:, 0], np.log(soft(logits)[a.tokens[:, 0]]), atol=1e-4)
    # top_k=1 and a tiny top_p are greedy
    greedy = ernie_jax.generate(model, prompt[:2], max_new_tokens=3, temperature=0.0)
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        got = ernie_jax.generate(model, prompt[:2], max_new_tokens=3, temperature=0.7, **kw)
        np.testing.assert_array_equal(got.tokens, greedy.tokens)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(truncated_logits(logits, 1.0, 0, 0.8))) & (
        np.asarray(truncated_logits(logits, 1.0, 0, 0.8)) > -1e30
    )
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.asarray(truncated_logits(logits, 1.0, 2, 1.0)) > -1e30
    assert kept.tolist() == [[True, True, False, False]]


def test_bad_requests_fail_in_one_line(tmp_path):
    _, path = make_hf_model(tmp_path, moe=False, layers=1)
    model = ernie_jax.load_pretrained(path)
    cases = [
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(max_new_tokens=2, top_p=0.0), "top_p=0.0"),
        (dict(max_new_tokens=2, top_p=1.5), "top_p=1.5"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature=-1.0"),
        (dict(max_new_tokens=10**6), "max_position_embeddings"),
    ]
    for kw, needle in cases:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            ernie_jax.generate(model, [[5, 6]], **kw)
    with pytest.raises(ConfigError, match="prompt is empty"):
        ernie_jax.generate(model, [[5, 6], []], max_new_tokens=2)
