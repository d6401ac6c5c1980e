"""A swap books the event loop's lateness per step, so a slow Predict during swaps can be laid
at the door of the step that caused it (the load's steps run on a worker thread)."""

from __future__ import annotations

import asyncio
import threading
import time

from xylen_server.versions.swap import LoopLag


def test_lateness_is_booked_on_the_step_that_held_the_loop() -> None:
    async def change() -> LoopLag:
        async with LoopLag() as lag:
            lag.step("quiet")
            await asyncio.sleep(0.03)
            lag.step("holding")
            time.sleep(0.06)  # on the loop: the probe's timer cannot run
            await asyncio.sleep(0.02)  # the late tick runs here, still in "holding"
            # A step entered from another thread (as load_model's are) is booked the same way.
            entered = threading.Thread(target=lag.step, args=("threaded",))
            entered.start()
            entered.join()
            await asyncio.sleep(0.02)
            lag.summary()
        return lag

    lag = asyncio.run(change())
    assert list(lag.steps) == ["start", "quiet", "holding", "threaded"]
    seconds, late = lag.steps["holding"]
    assert seconds >= 0.08
    # Held 60 ms with a 5 ms timer: at least 55 ms late, and booked on this step alone.
    assert late >= 0.06 - LoopLag.PERIOD - 0.0005
    assert lag.worst == max(late for _, late in lag.steps.values())
    assert lag.steps["threaded"][0] >= 0.02
    booked = dict(part.split(" ") for part in lag.summary().split(", "))
    assert list(booked) == list(lag.steps)
    assert float(booked["holding"].split("s/")[1].removesuffix("ms")) == round(late * 1e3, 1)
