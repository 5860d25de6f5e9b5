"""Encoding the core <-> front-end records: msgspec (msgpack, typed) against pickle, per message.

The messages are the ones a busy server sends: one ``StepOutputs`` with a decode step's outputs for a batch of
sequences (with and without log-probabilities) and one ``AddRequests`` of a batch of prompts. Encode + decode time
per message, the best of several repeats, and the size in bytes.

    python benchmarks/protocol_codec.py [--batch 256]
"""

from __future__ import annotations

import argparse
import pickle
import timeit

from inferneo.engine.protocol import (
    COMMAND_DECODER,
    MESSAGE_DECODER,
    AddRequests,
    CoreOutput,
    CoreRequest,
    EngineSnapshot,
    StepOutputs,
    encode,
)
from inferneo.sampling_params import SamplingParams


def messages(batch: int) -> dict[str, tuple[object, object]]:
    plain = StepOutputs([CoreOutput(f"cmpl-{i:032x}-0", [1000 + i], num_cached_tokens=16) for i in range(batch)],
                        [], batch, EngineSnapshot(num_running=batch, batch_size_histogram={batch: 100}))
    with_logprobs = StepOutputs(
        [CoreOutput(f"cmpl-{i:032x}-0", [1000 + i], None, None, [[1000 + i, *range(5)]], [[-0.5] * 6], [1])
         for i in range(batch)], [], batch, EngineSnapshot())
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=128, stop=["\n\n"])
    add = [AddRequests([CoreRequest(f"cmpl-{i:032x}-0", list(range(1024)), params, 128, frozenset({2}), 0, 1.0)
                        for i in range(batch)])]
    return {"step outputs": (plain, MESSAGE_DECODER), "step outputs + logprobs": (with_logprobs, MESSAGE_DECODER),
            "add requests (1024-token prompts)": (add, COMMAND_DECODER)}


def best(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=7)) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    print(f"batch {args.batch}: encode + decode per message (best of 7)")
    for name, (message, decoder) in messages(args.batch).items():
        packed, pickled = encode(message), pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        assert decoder.decode(packed) == message and pickle.loads(pickled) == message
        number = 50 if "add" in name else 500
        t_msgspec = best(lambda m=message, d=decoder: d.decode(encode(m)), number)
        t_pickle = best(lambda m=message: pickle.loads(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)), number)
        print(f"  {name:34s} msgspec {t_msgspec * 1e6:8.1f} us {len(packed):8d} B | pickle {t_pickle * 1e6:8.1f} us "
              f"{len(pickled):8d} B | pickle / msgspec {t_pickle / t_msgspec:.2f}x")


if __name__ == "__main__":
    main()
