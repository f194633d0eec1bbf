"""A Ray Serve app of ours on 127.0.0.1 at a port picked at run time, for the Serve tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ernie_cluster.distributed.process_group import free_port


@contextlib.contextmanager
def running_serve_app(name: str, **config_fields) -> Iterator[str]:
    """Start Serve's proxy on a free port, deploy `ServeAppConfig(**config_fields)` as `name`
    (not waiting for it to be healthy), yield the base URL; delete it and stop Serve after."""
    from ray import serve

    from ernie_cluster.serving.ray_serve.builder import build_app
    from ernie_cluster.serving.ray_serve.config import ServeAppConfig

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(ServeAppConfig(**config_fields)), name=name, route_prefix="/", blocking=False
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete(name)
        serve.shutdown()
