"""log.sample_prompts: a few fixed prompts continued greedily at every eval, so a run shows what the
model writes as it learns (rows of <workdir>/samples.jsonl and TensorBoard text)."""

from __future__ import annotations

import numpy as np

from ernie_jax.config import Config
from ernie_jax.data.chat import ChatError, end_ids, prompt_ids
from ernie_jax.errors import ConfigError
from ernie_jax.generation import generate, pad_prompts
from ernie_jax.trainers.state import model_of

PAD_TO = 32  # one compiled program for the whole run: the prompts never change


class PromptSampler:
    """Encodes the prompts once (a user turn of the chat format in chat / preference runs, plain text
    after bos otherwise) and checks they fit the model's positions before the first step."""

    def __init__(self, cfg: Config, tokenizer):
        if tokenizer is None:
            raise ConfigError(
                f"log.sample_prompts: data.kind={cfg.data.kind} has no tokenizer to encode them"
            )
        self.prompts = list(cfg.log.sample_prompts)
        self.tokenizer = tokenizer
        self.max_new_tokens = cfg.log.sample_max_new_tokens
        chat = cfg.data.kind in ("chat", "preference")
        try:
            ids = [
                prompt_ids(tokenizer, [{"role": "user", "content": p}], cfg.data.chat_mode)
                if chat
                else [tokenizer.bos_id, *tokenizer.encode(p)]
                for p in self.prompts
            ]
        except ChatError as e:
            raise ConfigError(f"log.sample_prompts: cannot render a prompt ({e.reason})") from None
        m = cfg.model
        self.ids, self.lengths = pad_prompts(ids, m.pad_token_id, PAD_TO)
        longest = int(self.lengths.max())
        if longest + self.max_new_tokens > m.max_position_embeddings:
            raise ConfigError(
                f"log.sample_prompts: a prompt of {longest} tokens + log.sample_max_new_tokens="
                f"{self.max_new_tokens} exceeds model.max_position_embeddings={m.max_position_embeddings}; "
                f"shorten the prompt or lower log.sample_max_new_tokens"
            )
        self.ends = end_ids(tokenizer, m.eos_token_id)

    def __call__(self, graphdef, state: dict) -> list[dict]:
        """[{"prompt", "completion", "tokens"}] from the train state's params (greedy)."""
        model = model_of(graphdef, state)
        got = generate(
            model,
            self.ids,
            prompt_lengths=self.lengths,
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
            eos_token_ids=self.ends,
        )
        rows = []
        for i, prompt in enumerate(self.prompts):
            toks = np.asarray(got.tokens[i, : int(got.lengths[i])]).tolist()
            text = toks[:-1] if toks and toks[-1] in self.ends else toks
            rows.append({"prompt": prompt, "completion": self.tokenizer.decode(text), "tokens": len(toks)})
        return rows
