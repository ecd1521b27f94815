"""The hidden state's move from one pipeline stage's virtual GPU to the next, on a copy stream.

As on CUDA: the sending GPU's compute stream records an event once the stage's work is queued;
the receiving GPU's hand-over stream waits for it and copies the hidden state (a peer copy);
an event recorded after the copy is what the receiving compute stream waits for before the next
stage reads it. The receiving GPU keeps computing the previous group's stage meanwhile, and the
copy shows on a track of its own in the trace. Each hand-over's two buffers are named for the
hazard checks, so a missing or misplaced event is a `HazardError`, not a silently wrong time.
"""

from __future__ import annotations

from itertools import count

HAND_OVER_STREAM = "hand-over"

_numbers = count()


def hand_over(costing, sender: int, receiver: int, stage: int, nbytes: int) -> None:
    """Charge moving `nbytes` of the hidden state from stage `stage - 1` on virtual GPU `sender`
    to stage `stage` on virtual GPU `receiver` (the costing's GPU is not changed)."""
    runtime = costing.runtime
    n = next(_numbers)
    sent, received = ("stage output", stage - 1, n), ("stage input", stage, n)
    sending = runtime.device(sender).default_stream
    receiving = runtime.device(receiver).default_stream
    copy_stream = runtime.device(receiver).stream(HAND_OVER_STREAM)
    produced, arrived = runtime.event(), runtime.event()
    costing.touch(sending, writes=[sent])  # the stage's work queued so far writes its output
    costing.record(sending, produced)
    costing.wait(copy_stream, produced)
    costing.copy(copy_stream, "hidden state", nbytes, "peer", src=sent, dst=received)
    costing.record(copy_stream, arrived)
    costing.wait(receiving, arrived)
    costing.touch(receiving, reads=[received])  # the next stage's work reads what arrived
