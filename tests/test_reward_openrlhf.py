"""The reward files as OpenRLHF 0.11.2 uses them: `--reward.remote_url reward_fns/<name>.py` loads the file
by path as module `reward_func` and calls it one sample at a time through asyncio.to_thread."""

from __future__ import annotations

import asyncio
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "<|im_start|>user\nQ: 37+45=?<|im_end|>\n<|im_start|>assistant\n"
SAMPLES = {
    "math.py": [
        ("<think>7+5=12</think>\\boxed{82}<|im_end|>", "82", 1.0),
        ("\\boxed{81}<|im_end|>", {"answer": "82"}, 0.0),
    ],
    "format.py": [("<think>add</think> 82<|im_end|>", "", 1.0), ("82<|im_end|>", "", 0.0)],
    "ifeval.py": [
        ("82<|im_end|>", {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, 1.0),
        ("8,2<|im_end|>", '{"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}', 0.0),
    ],
    "code.py": [
        ("```python\nprint(82)\n```<|im_end|>", {"cases": [{"stdin": "", "stdout": "82"}]}, 1.0),
        ("```python\nprint(81)\n```<|im_end|>", {"cases": [{"stdin": "", "stdout": "82"}]}, 0.0),
    ],
}


def test_openrlhf_loads_and_calls_each_reward_file():
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    for name, samples in SAMPLES.items():
        executor = SingleTurnAgentExecutor(remote_rm_url=os.path.join(ROOT, "reward_fns", name))

        async def concurrently(executor=executor, samples=samples):
            calls = [
                executor._fetch_rewards_via_func([PROMPT + r], [PROMPT], [label])
                for r, label, _ in samples * 4
            ]
            return await asyncio.gather(*calls)

        outputs = [chunks[0] for chunks in asyncio.run(concurrently())]
        assert [out["rewards"].item() for out in outputs] == [expected for _, _, expected in samples] * 4, (
            name
        )
        keys = set(outputs[0]["extra_logs"])
        for out in outputs:
            # What samples_generator.py does with the result (reward, score, extra_logs -> info tensors).
            assert torch.tensor([out["rewards"]]).shape == (1,) and torch.tensor([out["scores"]]).shape == (
                1,
            )
            assert set(out["extra_logs"]) == keys
            assert all(
                torch.tensor([v.flatten()[0].item()]).shape == (1,) for v in out["extra_logs"].values()
            )
