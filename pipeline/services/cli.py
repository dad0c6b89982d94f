"""``inferlane serve fraud-check|recommendations``: the consumer services (typer sub-app).

Each command runs one HTTP service until SIGTERM/SIGINT; ``--openapi`` prints its OpenAPI
document instead. Settings come from ``INFERLANE_*`` like everything else; options override the
port, host and budget.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Annotated

import typer

from pipeline.services.http import HttpService, serve
from pipeline.settings import Settings, load_settings

__all__ = ["serve_app"]

serve_app = typer.Typer(help="Consumer services over HTTP: fraud-check and recommendations.",
                        no_args_is_help=True, add_completion=False,
                        pretty_exceptions_enable=False)

Host = Annotated[str | None, typer.Option(help="Listen address (default "
                                               "INFERLANE_SERVICE_HOST).")]
OpenApi = Annotated[bool, typer.Option("--openapi", help="Print the OpenAPI document and exit.")]


def _run(settings: Settings, make: Callable[[Settings], HttpService], host: str | None,
         port: int, openapi: bool) -> None:
    service = make(settings)
    if openapi:
        from pipeline.services.openapi import openapi_document

        typer.echo(json.dumps(openapi_document(service), indent=2))
        return
    logging.basicConfig(level=logging.INFO,
                        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s")
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(serve(service, host or settings.service_host, port))


@serve_app.command("fraud-check")
def fraud_check(
    port: Annotated[int | None, typer.Option(help="Port (default "
                                                  "INFERLANE_FRAUD_CHECK_PORT, 8081).")] = None,
    host: Host = None,
    budget_ms: Annotated[float | None, typer.Option(
        help="Answer from the rules when the pipeline's score is not back this soon (default "
             "INFERLANE_FRAUD_CHECK_BUDGET_MS, 50).", min=0.1)] = None,
    openapi: OpenApi = False,
) -> None:
    """POST /v1/check: approve/review/decline within the budget (model, else rules)."""
    from pipeline.services.fraudcheck import FraudCheckService

    settings = load_settings()
    _run(settings, lambda s: FraudCheckService(s, budget_ms=budget_ms), host,
         settings.fraud_check_port if port is None else port, openapi)


@serve_app.command("recommendations")
def recommendations(
    port: Annotated[int | None, typer.Option(help="Port (default "
                                                  "INFERLANE_RECO_SERVICE_PORT, 8082).")] = None,
    host: Host = None,
    deadline_ms: Annotated[float | None, typer.Option(
        help="Answer with stored, else popular items when the pipeline's result is not back "
             "this soon (default INFERLANE_RECO_SERVICE_DEADLINE_MS, 100).", min=0.1)] = None,
    openapi: OpenApi = False,
) -> None:
    """POST /v1/recommend: a user's top-k within the deadline (pipeline, else stored, else
    popular); GET /v1/recommendations/{user_id}: the latest ones read from reco.results."""
    from pipeline.services.recommendations import RecommendationService

    settings = load_settings()
    _run(settings, lambda s: RecommendationService(s, deadline_ms=deadline_ms), host,
         settings.reco_service_port if port is None else port, openapi)
