"""What a person could do instead of SPA, with the same examples: few-shot prompting and greedy generation.

* **Few-shot prompting**: the first k of the person's examples go into every prompt
  as earlier chat turns (their document with the generic instruction, then their
  summary as the assistant's answer), the new document last. When those turns do
  not fit the context (`max_prompt_tokens`, the gateway's prompt limit), the
  examples' summaries alone go into one user turn as style examples, before the
  new document. The cloud then reads the examples on every request.
* The backbone alone and a LoRA-adapted backbone (evaluation/lora.py) generate
  with `greedy`, over the one generation loop (spa/model/generate.py).
"""

from spa.data.examples import Example
from spa.model.generate import generate

STYLE_LEAD = "Here are summaries written the way I like them:"


def few_shot_prompt(tokenizer, shots: list[Example], document: str, instruction: str,
                    max_prompt_tokens: int) -> tuple[str, str]:
    """(prompt text, "documents" or "summaries only"): the k-shot prompt for `document`."""
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": f"{shot.document}\n\n{instruction}"},
                     {"role": "assistant", "content": shot.summary}]
    messages.append({"role": "user", "content": f"{document}\n\n{instruction}"})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_prompt_tokens:
        return text, "documents"
    style = "\n\n".join([STYLE_LEAD] + [shot.summary for shot in shots])
    messages = [{"role": "user", "content": f"{style}\n\n{document}\n\n{instruction}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), "summaries only"


def greedy(backbone, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The backbone's greedy continuation of the prompt (ending with EOS, or at max_new_tokens)."""
    tokens = []
    choose = lambda pos, states: backbone.logits(states[:, -1]).argmax(-1).tolist()  # noqa: E731
    for _, _, chosen in generate(backbone, prompt_ids, choose, max_new_tokens):
        tokens += chosen
    return tokens
