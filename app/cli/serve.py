"""The commands that run services: `serve`, `workbench`, `demo` and `worker`.

Top-level commands are registered (in `quarkflow --help` order) by app/cli/__init__.py."""

from __future__ import annotations

import sys

import typer

from app.cli.common import _settings, console


def serve(
    host: str = typer.Option("127.0.0.1", help="Bind address (0.0.0.0 for a server)."),
    port: int = typer.Option(8000),
    workers: int = typer.Option(1, help="Uvicorn worker processes."),
    grpc_port: int | None = typer.Option(
        None,
        min=0,
        max=65535,
        help="Open Inference Protocol gRPC port (default QF_GRPC_PORT, 8001; 0 = off).",
    ),
) -> None:
    """Run the REST API (+ OpenAPI at /docs), the Gradio demo at /demo, /metrics, /readyz,
    and the Open Inference Protocol (REST /v2, gRPC on --grpc-port).

    One server serves every project (each project's champion, its own paths); ``--project``
    does not apply."""
    import uvicorn

    from quarkflow_core.database import check_database, get_engine

    settings = _settings()
    if grpc_port is not None:
        if workers > 1:  # the workers build their app from QF_* settings (app.main)
            raise typer.BadParameter("with --workers > 1 set QF_GRPC_PORT instead")
        settings = settings.model_copy(update={"grpc_port": grpc_port})
    check_database(get_engine(settings.database_url))
    console.print(
        f"Quarkflow API on http://{host}:{port}  (docs /docs, demo /demo, metrics /metrics)"
    )
    if settings.grpc_port:
        console.print(f"Open Inference Protocol: REST /v2, gRPC on {host}:{settings.grpc_port}")
    if workers > 1:
        uvicorn.run(
            "app.main:app",
            host=host,
            port=port,
            workers=workers,
            log_level="warning",
            loop="uvloop",  # uvloop + httptools (pinned): less of the cores spent on HTTP
            http="httptools",
        )
    else:
        from app.api import create_app

        uvicorn.run(
            create_app(settings, host=host),
            host=host,
            port=port,
            log_level="warning",
            loop="uvloop",
            http="httptools",
        )


def workbench(
    port: int = typer.Option(8501),
    host: str = typer.Option("127.0.0.1", help="Bind address (0.0.0.0 for a server)."),
) -> None:
    """Run the Streamlit workbench (sign in with a Quarkflow user)."""
    import os

    from app.launcher import streamlit_argv
    from quarkflow_core.database import check_database, get_engine

    check_database(get_engine(_settings().database_url))
    console.print(f"Quarkflow workbench on http://{host}:{port}")
    sys.stdout.flush()
    argv = streamlit_argv(host=host, port=port)
    os.execv(argv[0], argv)  # noqa: S606 - becomes Streamlit: signals reach it directly


def demo(
    host: str = typer.Option("127.0.0.1", help="Bind address of every service."),
    port: int = typer.Option(8000, help="API + Gradio demo."),
    wb_port: int = typer.Option(8501, help="Streamlit workbench."),
    prefect_port: int = typer.Option(4200, help="Local Prefect server (the worker's)."),
    epochs: int = typer.Option(15, help="Epochs for the first demo model (trained once)."),
    traffic: int = typer.Option(300, help="Unseen digits sent through the API on first start."),
    detection: bool = typer.Option(
        True, help="Also the digits-on-photos detection project (a detector trained once)."
    ),
    detector_epochs: int | None = typer.Option(
        None, help="Epochs for the demo detector (default: its recipe's)."
    ),
    detection_images: int = typer.Option(
        400, help="Seed images of the detection project (25% held out)."
    ),
) -> None:
    """The whole product on this machine: prepare the demo, start the API + demo, the
    workbench and the worker, wired together. Ctrl-C (or SIGTERM) stops all of them."""
    from app.launcher import DemoPlan, run_demo

    plan = DemoPlan(
        host=host,
        api_port=port,
        wb_port=wb_port,
        prefect_port=prefect_port,
        epochs=epochs,
        traffic=traffic,
        detection=detection,
        detector_epochs=detector_epochs,
        detection_images=detection_images,
    )
    raise typer.Exit(run_demo(_settings(), plan, out=lambda line: console.print(line)))


def worker(
    prefect_port: int = typer.Option(4200, help="Port of the local Prefect server, if started."),
) -> None:
    """Serve the Prefect deployments (retrain, batch_predict, promote, label_trigger).

    Uses QF_PREFECT_API_URL when set; otherwise starts a local Prefect server first."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deployments import deployments
    from quarkflow_core.orchestration import local_prefect_server

    settings = _settings()
    with local_prefect_server(settings.prefect_api_url, port=prefect_port) as api_url:
        console.print(f"Prefect API {api_url}; serving the deployments (Ctrl-C stops)")
        with temporary_settings({PREFECT_API_URL: api_url}):
            prefect_serve(*deployments(settings))
