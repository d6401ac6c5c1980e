"""Start-up's long-lived objects (the model, sessions, protobuf descriptors, modules) are moved
out of the garbage collector's generations once the server is loaded, so a full collection
under load does not walk them."""

from __future__ import annotations

import gc

from harness import InProcessServer, server_settings


def test_a_loaded_server_has_frozen_what_start_up_built(models_root):
    gc.unfreeze()  # whatever an earlier server in this test process froze
    assert gc.get_freeze_count() == 0
    server = InProcessServer(server_settings(models_root))
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # modules, descriptors, the model: tens of thousands of objects
        assert server.running.predictor.ready
    finally:
        server.close()
