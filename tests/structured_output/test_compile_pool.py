"""The grammar compile pool's bounds: a queued compile nobody waits for is cancelled, a full
queue refuses a new spec at once, a compile past the timeout is refused as too complex while
another thread takes its place, the cache stays under its byte budget, and a slow grammar
never holds up a small one (engine level, a ratio against the small one's own baseline)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ernie_cluster import LLM, SamplingParams
from ernie_cluster.config.engine_config import EngineConfig
from ernie_cluster.config.model_config import ErnieMoeConfig
from ernie_cluster.engine.async_engine import AsyncLLMEngine
from ernie_cluster.engine.llm_engine import BatchFailedError
from ernie_cluster.sampling_params import StructuredOutputsParams
from ernie_cluster.structured_output.compiler import (
    CompileLimits,
    GrammarBusyError,
    GrammarCompiler,
    GrammarTimeoutError,
)
from ernie_cluster.structured_output.params import GrammarSpec
from ernie_cluster.tokenizer import load_tokenizer

PROMPT = "Answer with one of the allowed values."


def regex_spec(pattern: str) -> GrammarSpec:
    return GrammarSpec.from_format({"type": "regex", "pattern": pattern})


def choice_spec(count: int, tag: str) -> GrammarSpec:
    values = [{"type": "const_string", "value": f"{tag}-{i:06d}"} for i in range(count)]
    return GrammarSpec.from_format({"type": "or", "elements": values})


def make_compiler(checkpoint, **limits) -> GrammarCompiler:
    defaults = {"threads": 1, "timeout_s": 30.0, "max_pending": 8, "cache_bytes": 2**30}
    vocab_size = ErnieMoeConfig.from_pretrained(checkpoint).vocab_size
    tokenizer = load_tokenizer(checkpoint)
    return GrammarCompiler(tokenizer, vocab_size, [2], CompileLimits(**{**defaults, **limits}))


class Gate:
    """Replaces a compiler's xgrammar call: specs in `held` block until opened; records
    which specs started compiling."""

    def __init__(self, compiler: GrammarCompiler, held: set[str]) -> None:
        self.real = compiler._compile
        self.held = held
        self.opened = threading.Event()
        self.started: list[str] = []
        compiler._compile = self

    def __call__(self, structural_tag: str):
        self.started.append(structural_tag)
        if structural_tag in self.held:
            self.opened.wait(timeout=60)
        return self.real(structural_tag)


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_abandoned_waiters_cancel_a_queued_compile(tiny_checkpoint):
    compiler = make_compiler(tiny_checkpoint)
    slow, queued = regex_spec("[a-c]{1,4}"), regex_spec("[d-f]{1,4}")
    gate = Gate(compiler, {slow.structural_tag})
    running = compiler.submit(slow)
    first, second = compiler.submit(queued), compiler.submit(queued)
    assert first is second and compiler.num_pending == 1
    first.release()
    assert not second.future.cancelled()  # one request still waits for it
    second.release()
    assert second.future.cancelled() and compiler.num_pending == 0
    gate.opened.set()
    running.future.result(timeout=30)
    assert gate.started == [slow.structural_tag]  # the abandoned spec never compiled
    again = compiler.submit(queued)  # asked again later: a fresh compile
    assert again is not second and again.future.result(timeout=30) is not None
    compiler.shutdown()


def test_a_full_queue_refuses_a_new_spec_at_once(tiny_checkpoint):
    compiler = make_compiler(tiny_checkpoint, max_pending=2, timeout_s=7.5)
    specs = [regex_spec(f"[a-{letter}]{{2}}") for letter in "cdef"]
    gate = Gate(compiler, {specs[0].structural_tag})
    jobs = [compiler.submit(spec) for spec in specs[:3]]  # one running, two queued
    with pytest.raises(GrammarBusyError, match=r"2 output constraints .* limit is 2") as busy:
        compiler.submit(specs[3])  # at once: the running compile is still held at the gate
    assert not gate.opened.is_set() and not jobs[0].future.done()
    assert busy.value.http_status == 503 and busy.value.retry_after_s == 8
    assert compiler.submit(specs[1]) is jobs[1]  # a spec already queued is joined, not refused
    gate.opened.set()
    for job in jobs:
        assert job.future.result(timeout=30) is not None
    assert compiler.submit(specs[3]).future.result(timeout=30) is not None  # room again
    compiler.shutdown()


def test_an_overrunning_compile_is_refused_and_replaced(tiny_checkpoint):
    compiler = make_compiler(tiny_checkpoint, threads=1, timeout_s=1.0)
    stuck = [regex_spec("[g-i]{3}"), regex_spec("[j-l]{3}")]
    gate = Gate(compiler, {spec.structural_tag for spec in stuck})
    first = compiler.submit(stuck[0])
    wait_until(lambda: first.started_at is not None)
    assert first.failure(waited_s=0.0) is None
    time.sleep(1.1)
    error = first.failure(waited_s=1.1)
    assert isinstance(error, GrammarTimeoutError) and isinstance(error, ValueError)
    assert str(error) == ("the output constraint is too complex: it did not compile within 1 s")
    # The overrun frees its slot: the next spec starts on a new thread while it still runs.
    second = compiler.submit(stuck[1])
    wait_until(lambda: second.started_at is not None)
    time.sleep(1.1)
    compiler.poll()
    # Two overruns with one thread: the cap is reached, a third spec waits and is told so.
    third = compiler.submit(regex_spec("[m-o]{3}"))
    compiler.poll()
    assert third.started_at is None
    busy = third.failure(waited_s=1.1)
    assert isinstance(busy, GrammarBusyError) and "busy" in str(busy)
    gate.opened.set()
    assert third.future.result(timeout=30) is not None  # runs once an overrun ends
    # A finished overrun is remembered as too complex: a retry is refused at once.
    with pytest.raises(GrammarTimeoutError):
        first.future.result(timeout=30)
    retry = compiler.submit(stuck[0])
    assert retry is first and isinstance(retry.failure(waited_s=0.0), GrammarTimeoutError)
    compiler.shutdown()


def test_cache_is_bounded_by_bytes(tiny_checkpoint):
    probe = make_compiler(tiny_checkpoint)
    one = probe.submit(choice_spec(300, "probe"))
    one.future.result(timeout=60)
    entry_bytes = one.nbytes  # spec text + compiled grammar
    assert entry_bytes > len(one.key)
    probe.shutdown()
    budget = int(entry_bytes * 2.5)
    compiler = make_compiler(tiny_checkpoint, cache_bytes=budget)
    specs = [choice_spec(300, tag) for tag in ("aaaaa", "bbbbb", "ccccc", "ddddd")]
    jobs = []
    for spec in specs:
        job = compiler.submit(spec)
        job.future.result(timeout=60)
        jobs.append(job)
        assert compiler.cache_bytes <= budget
    # The two most recent fit; the older ones were evicted (a new submit compiles again).
    assert compiler.submit(specs[3]) is jobs[3]
    assert compiler.submit(specs[2]) is jobs[2]
    assert compiler.submit(specs[0]) is not jobs[0]
    compiler.shutdown()
    # A grammar bigger than the whole budget is served to its waiters but never kept.
    tiny = make_compiler(tiny_checkpoint, cache_bytes=entry_bytes // 2)
    big = tiny.submit(specs[0])
    assert big.future.result(timeout=60) is not None
    assert tiny.cache_bytes == 0 and tiny.submit(specs[0]) is not big
    tiny.shutdown()


def run_until_finished(engine, request_id: str, max_steps: int = 100_000) -> float:
    """Step the engine until `request_id` finishes; seconds it took."""
    start = time.perf_counter()
    for _ in range(max_steps):
        if any(out.request_id == request_id and out.finished for out in engine.step()):
            return time.perf_counter() - start
    raise AssertionError(f"{request_id} did not finish in {max_steps} steps")


def one_slot_config(checkpoint, timeout_s: float) -> dict:
    """Engine settings of one compile thread and room for one more compile to wait."""
    return dict(
        model=str(checkpoint),
        dtype="float32",
        show_progress=False,
        grammar_compile_threads=1,
        grammar_compile_timeout_s=timeout_s,
        grammar_max_pending_compiles=1,
    )


def small_params(pattern: str) -> SamplingParams:
    spec = StructuredOutputsParams(regex=pattern)
    return SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=spec)


@pytest.mark.slow  # a real 10,000-choice compile (~2 s alone, more on a busy machine)
def test_a_slow_grammar_does_not_hold_up_a_small_one(tiny_checkpoint):
    with LLM(model=str(tiny_checkpoint), dtype="float32", show_progress=False) as llm:
        engine = llm.engine
        engine.add_request("warm", PROMPT, small_params("[a-z]{3}"))
        run_until_finished(engine, "warm")
        engine.add_request("baseline", PROMPT, small_params("[0-9]{4}"))
        baseline_s = run_until_finished(engine, "baseline")
        choices = [f"value-{i:06d}" for i in range(10_000)]
        slow = StructuredOutputsParams(choice=choices)
        engine.add_request("slow", PROMPT, SamplingParams(max_tokens=8, structured_outputs=slow))
        engine.add_request("small", PROMPT, small_params("[A-Z]{4}"))
        small_s = run_until_finished(engine, "small")
        slow_job = engine.scheduler.requests["slow"].grammar.job
        still_compiling = not slow_job.future.done()
        engine.abort_request("slow")
        slow_job.future.exception(timeout=300)  # it cannot be interrupted: let it end here
        assert still_compiling, "the slow grammar finished first: the test proves nothing"
        assert small_s < 10 * baseline_s, (small_s, baseline_s)


def test_engine_ends_timed_out_and_refuses_when_full(tiny_checkpoint):
    with LLM(**one_slot_config(tiny_checkpoint, timeout_s=0.5)) as llm:
        engine = llm.engine
        held_spec = engine.processor.process("probe", PROMPT, small_params("[p-r]{5}")).grammar
        gate = Gate(engine.structured.compiler, {held_spec.structural_tag})
        engine.add_request("held", PROMPT, small_params("[p-r]{5}"))
        engine.add_request("queued", PROMPT, small_params("[s-u]{5}"))
        with pytest.raises(GrammarBusyError, match="limit is 1"):
            engine.add_request("refused", PROMPT, small_params("[v-x]{5}"))
        assert "refused" not in engine.output_processor.groups
        queued_job = engine.scheduler.requests["queued"].grammar.job
        engine.abort_request("queued")  # its client went away: the queued compile goes too
        assert queued_job.future.cancelled()
        engine.add_request("free", PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))
        failures = []
        for _ in range(10_000):
            try:
                engine.step()
            except BatchFailedError as failure:
                failures.append(failure)
            if not engine.has_unfinished_requests():
                break
        gate.opened.set()
        assert [f.request_ids for f in failures] == [["held"]]
        error = failures[0].errors["held"]
        assert isinstance(error, GrammarTimeoutError) and "within 0.5 s" in str(error)
        assert gate.started == [held_spec.structural_tag]  # the aborted one never compiled


def test_async_streams_get_the_worded_errors(tiny_checkpoint):
    config = EngineConfig(**one_slot_config(tiny_checkpoint, timeout_s=1.0))
    engine = AsyncLLMEngine.from_config(config)
    process = engine.engine.processor.process
    held = [process("p", PROMPT, small_params(p)).grammar for p in ("[a-e]{6}", "[f-j]{6}")]
    gate = Gate(engine.engine.structured.compiler, {spec.structural_tag for spec in held})

    async def first_error(request_id: str, pattern: str) -> BaseException | None:
        try:
            async for _ in engine.generate(PROMPT, small_params(pattern), request_id):
                pass
        except Exception as exc:
            return exc
        return None

    async def main():
        held_task = asyncio.create_task(first_error("held", "[a-e]{6}"))
        queued_task = asyncio.create_task(first_error("queued", "[f-j]{6}"))
        await asyncio.sleep(0.1)
        refused = await first_error("refused", "[k-o]{6}")
        free = [out async for out in engine.generate(PROMPT, SamplingParams(max_tokens=3), "free")]
        return await held_task, await queued_task, refused, free

    try:
        held_error, queued_error, refused, free = asyncio.run(main())
    finally:
        gate.opened.set()
        asyncio.run(engine.shutdown())
    assert isinstance(held_error, GrammarTimeoutError) and "within 1 s" in str(held_error)
    # The queued spec only started when the held one overran: busy, not too complex.
    assert isinstance(queued_error, GrammarBusyError) and "busy" in str(queued_error)
    assert isinstance(refused, GrammarBusyError) and refused.retry_after_s == 1
    assert free[-1].finished and free[-1].outputs[0].finish_reason == "length"


def test_compile_settings_are_checked_and_reach_the_compiler():
    bad = {
        "grammar_compile_threads": (0, "grammar_compile_threads must be >= 1, got 0"),
        "grammar_max_pending_compiles": (-1, "grammar_max_pending_compiles must be >= 1, got -1"),
        "grammar_compile_timeout_s": (float("nan"), "finite number > 0, got nan"),
        "grammar_cache_bytes": (-5, "grammar_cache_bytes must be >= 0, got -5"),
    }
    for name, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            EngineConfig(model="m", **{name: value})
    with pytest.raises(ValueError, match="got inf"):
        EngineConfig(model="m", grammar_compile_timeout_s=float("inf"))
    config = EngineConfig(
        model="m",
        grammar_compile_threads=3,
        grammar_compile_timeout_s=2.5,
        grammar_max_pending_compiles=7,
        grammar_cache_bytes=1234,
    )
    assert CompileLimits.from_config(config) == CompileLimits(3, 2.5, 7, 1234)
    defaults = CompileLimits.from_config(EngineConfig(model="m"))
    assert defaults == CompileLimits(2, 10.0, 64, 512 * 2**20)
