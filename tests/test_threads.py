"""What may run concurrently (README, "Errors and limits"), case by case: the same model
quantized from two threads, the float model called while it is quantized, a quantized
model called while it is saved or while another model is quantized. Each case ends in
the results a single thread gets, bit for bit.

Two mechanisms make it so (``clq_compile.capture``): torch.export traces a structural
copy of the module (it swaps fake tensors into the module it traces), and exports hold
``EXPORT_LOCK`` exclusively while quantized-model calls and calibration hold it shared
(torch.export turns oneDNN/NNPACK/cuDNN off process-wide while it traces, so a
convolution overlapping it rounds differently)."""

import contextlib
import threading

import pytest
import torch
from torch.export._trace import _ignore_backend_decomps

import clq_compile as clq
from clq_compile.testing import tiny_pixart


def _quantize(model, inputs):
    return clq.quantize(model, [inputs(0)], recipe="rtn", bits="w4a4", measure=False,
                        extra_shapes=None)


def _out(m, x):
    with torch.no_grad():
        return m(**x)[0]


def _assert_same_model(qm, again, x):
    assert qm.graph_module.code == again.graph_module.code
    assert torch.equal(_out(qm, x), _out(again, x))


@pytest.fixture(scope="module")
def pixart():
    """The tiny model, and its quantized form from a single thread (the reference)."""
    model, inputs = tiny_pixart(seed=0)
    return model, inputs, _quantize(model, inputs)


class Caller:
    """Calls ``fn`` in a thread, over and over, from before ``during`` starts until it
    ends; keeps every result and the first error."""

    def __init__(self, fn):
        self.fn, self.results, self.errors = fn, [], []
        self._started, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop)

    def _loop(self):
        try:
            while True:
                self.results.append(self.fn())
                self._started.set()
                if self._stop.is_set():
                    return
        except Exception as e:  # noqa: BLE001 - the test reports it
            self.errors.append(e)
            self._started.set()

    @contextlib.contextmanager
    def during(self):
        self._thread.start()
        self._started.wait()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()


def _in_threads(fns):
    """Run each of ``fns`` in its own thread; their results, and any errors."""
    results, errors = [None] * len(fns), []

    def run(i):
        try:
            results[i] = fns[i]()
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_two_threads_quantize_at_once():
    """Two different models at once: the models equal a sequential run's. (Models are
    built first: their seeding uses the global RNG.)"""
    models = [tiny_pixart(seed=s) for s in (0, 1)]
    results, errors = _in_threads([lambda m=m: _quantize(*m) for m in models])
    assert not errors, errors
    for qm, (model, inputs) in zip(results, models, strict=True):
        _assert_same_model(qm, _quantize(model, inputs), inputs(2))


def test_same_model_quantized_from_two_threads(pixart):
    """The same model object from two threads: both succeed and equal the single-thread
    result (export traced each thread's own copy of the module tree, so neither saw the
    other's fake tensors)."""
    model, inputs, reference = pixart
    results, errors = _in_threads([lambda: _quantize(model, inputs)] * 2)
    assert not errors, errors
    for qm in results:
        _assert_same_model(qm, reference, inputs(2))


def test_float_model_called_while_it_is_quantized(pixart):
    """The float model called over and over in one thread while another quantizes it:
    no call fails, and the quantize equals the single-thread one. Each float output is
    the single-thread output with the convolution backends on or, for a call that
    overlapped an export, off (torch switches them off process-wide while it traces,
    and the caller's own calls are not the library's to hold back): PixArt's one
    convolution (the patch embedding) takes one or the other kernel, nothing else."""
    model, inputs, reference = pixart
    x = inputs(1)
    on = _out(model, x)
    with _ignore_backend_decomps():  # the backends off, as export turns them
        off = _out(model, x)
    with Caller(lambda: _out(model, x)).during() as floats:
        qm = _quantize(model, inputs)
    assert not floats.errors, floats.errors
    assert all(torch.equal(y, on) or torch.equal(y, off) for y in floats.results)
    _assert_same_model(qm, reference, inputs(2))


def test_quantized_model_called_while_it_is_saved(pixart, tmp_path):
    """``qm.save`` re-exports qm's graph; calls in another thread meanwhile run on the
    graph as it is (export traced a copy) and wait out the export: every output is the
    single-thread one."""
    _, inputs, qm = pixart
    x = inputs(1)
    expected = _out(qm, x)
    with Caller(lambda: _out(qm, x)).during() as calls:
        qm.save(tmp_path / "q")
    assert not calls.errors, calls.errors
    assert all(torch.equal(y, expected) for y in calls.results)


def test_served_model_is_bit_stable_while_another_is_quantized(pixart):
    """A quantized model served in one thread while another quantizes a different model:
    every output equals the single-thread one (before the fix, torch.export's switching
    oneDNN off moved the patch embedding's rounding in most calls)."""
    _, inputs, qm = pixart
    x = inputs(1)
    expected = _out(qm, x)
    other = tiny_pixart(seed=1)
    with Caller(lambda: _out(qm, x)).during() as calls:
        _quantize(*other)
    assert not calls.errors, calls.errors
    assert all(torch.equal(y, expected) for y in calls.results)
