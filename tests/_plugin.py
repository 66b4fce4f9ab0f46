"""The "Gradient Flow" plugin on TensorBoard's python data provider, its routes called without a server."""

from __future__ import annotations

import json
from typing import Any


def plugin_over(logdir: str) -> tuple[Any, Any]:
    """The plugin on TensorBoard's real python data provider over ``logdir``, and its multiplexer.

    Every gradwatch summary is kept (as ``--samples_per_plugin=gradwatch=0`` does).
    """
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin

    from gradwatch.tb_plugin.plugin import GradientFlowPlugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"gradwatch": 0})
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
    return GradientFlowPlugin(base_plugin.TBContext(data_provider=provider, logdir=logdir)), multiplexer


def get_json(plugin: Any, route: str, **params: Any) -> tuple[int, Any]:
    """(status, decoded JSON body) of ``GET /data/plugin/gradwatch<route>?params`` on ``plugin``."""
    from werkzeug.test import Client

    client = Client(plugin.get_plugin_apps()[route])
    response = client.get(f"/data/plugin/gradwatch{route}", query_string=params)
    return response.status_code, json.loads(response.data)
