"""Many concurrent streams: all complete, and each equals its non-streamed counterpart (greedy)."""

from __future__ import annotations

import asyncio

import openai

N = 32


def test_concurrent_streams_match_non_streamed(server) -> None:
    async def main() -> tuple[list[str], list[str], list[str]]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
            def kw(i: int) -> dict:
                prompt = f"story number {i} " * (i % 4 + 1)  # different lengths: prefill and decode mix
                return dict(model="tiny-falcon", messages=[{"role": "user", "content": prompt}],
                            max_tokens=16 + i % 5, temperature=0)

            async def streamed(i: int) -> tuple[str, str]:
                parts, finish = [], ""
                async for chunk in await c.chat.completions.create(stream=True, **kw(i)):
                    for choice in chunk.choices:
                        parts.append(choice.delta.content or "")
                        finish = choice.finish_reason or finish
                return "".join(parts), finish

            async def plain(i: int) -> str:
                return (await c.chat.completions.create(**kw(i))).choices[0].message.content

            streams = await asyncio.gather(*(streamed(i) for i in range(N)))
            plains = await asyncio.gather(*(plain(i) for i in range(N)))
            return [t for t, _ in streams], [f for _, f in streams], plains

    texts, finishes, plains = asyncio.run(main())
    assert all(f in ("stop", "length") for f in finishes)
    assert texts == plains
    server.wait_idle()
