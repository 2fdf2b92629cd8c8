"""Training routes: launch ``train_lora`` through Dagster's GraphQL, follow its run, cancel it."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lora_pipeline.api.http import Api, ApiError, RouteSpec, check_webhook_url, json_body, style_of
from lora_pipeline.api.version_routes import read_document
from lora_pipeline.contracts.families import BaseModelRefused
from lora_pipeline.contracts.run_tags import API_TRAINING_TAG
from lora_pipeline.dataset.versions import current_dataset
from lora_pipeline.lifecycle.callbacks import RunFacts, new_training_id, save_watch, watch_training
from lora_pipeline.lifecycle.submit import training_params
from lora_pipeline.registry.version_refs import resolve_version_ref


async def launch_training(api: Api, request: Request) -> Response:
    """Train the style's current dataset: a train_lora run in Dagster; answers its version.
    ---
    summary: Start a training
    requestBody: {content: {application/json: {example: {baseModel: tiny, modelFamily: auto, params: {max_train_steps: 30}, webhook: "https://app.example/hooks/lora"}}}}
    responses:
      201: {description: "trainingId, runId, version (null while the run waits for a GPU slot)"}
      400: {description: "a base model no family trains, or one of another family than modelFamily (one line naming both)"}
      409: {description: the style has no dataset yet}
      422: {description: a bad parameter or webhook URL (named)}
      502: {description: Dagster refused or is unreachable}
    """
    style = style_of(request)
    body = await json_body(request, allow_empty=True)
    base_model = str(body.get("baseModel", "tiny"))
    model_family = str(body.get("modelFamily", "auto"))
    params = body.get("params") or {}
    webhook = body.get("webhook")
    if not isinstance(params, dict):
        raise ApiError(422, "params: expected an object of TrainingParams fields")
    try:
        checked = await run_in_threadpool(
            training_params, base_model, params, model_family=model_family, store=api.store
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ApiError(422, f"params.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except BaseModelRefused as exc:
        raise ApiError(400, str(exc)) from None
    if webhook is not None:
        check_webhook_url(webhook)
        if not api.config.webhook_secret:
            raise ApiError(422, "webhook: this server has no LORA_API_WEBHOOK_SECRET to sign callbacks with")
    if await run_in_threadpool(current_dataset, api.store, style) is None:
        raise ApiError(409, f"style {style!r} has no dataset: upload files and complete the upload first")
    training_id = new_training_id()
    watch = await run_in_threadpool(watch_training, api.store, training_id, style, webhook) if webhook else None
    run_config = {
        "ops": {
            "submit_lora_training": {
                "config": {
                    "base_model": base_model,
                    "model_family": model_family,
                    "params": {k: v for k, v in checked.model_dump(mode="json").items() if k in params},
                    "force": bool(body.get("force", False)),
                }
            }
        }
    }
    run_id = await run_in_threadpool(api.dagster.launch_training, style, run_config, {API_TRAINING_TAG: training_id})
    if watch is not None:
        watch = replace(watch, run_id=run_id)
        await run_in_threadpool(save_watch, api.store, watch)
    facts = await run_in_threadpool(wait_for_version, api, run_id)
    answer = training_json(api, style, run_id, facts) | {"trainingId": training_id, "webhook": webhook}
    headers = {"Location": f"/v1/styles/{style}/trainings/{run_id}"}
    return JSONResponse(answer, status_code=201, headers=headers)


def wait_for_version(api: Api, run_id: str) -> RunFacts | None:
    """The run's facts once its step has tagged the version (or it ended), else after version_wait_s."""
    deadline = time.monotonic() + api.config.version_wait_s
    while True:
        facts = api.dagster.run_facts(run_id)
        if facts is None or facts.version or facts.status in ("FAILURE", "CANCELED", "SUCCESS"):
            return facts
        if time.monotonic() >= deadline:
            return facts
        time.sleep(0.5)


def training_json(api: Api, style: str, run_id: str, facts: RunFacts | None) -> dict[str, Any]:
    return {
        "style": style,
        "runId": run_id,
        "runStatus": facts.status if facts else None,
        "version": facts.version if facts else None,
        "dagsterRunUrl": f"{api.dagster.url}/runs/{run_id}",
    }


async def show_training(api: Api, request: Request) -> Response:
    """A training run's status and the version it trains (once its step has claimed one).
    ---
    summary: Show a training run
    responses: {200: {description: "runStatus, version, versionStatus"}, 404: {description: no such run}}
    """
    style = style_of(request)
    run_id = request.path_params["run_id"]
    facts = await run_in_threadpool(api.dagster.run_facts, run_id)
    if facts is None:
        raise ApiError(404, f"Dagster has no run {run_id!r}")
    answer = training_json(api, style, run_id, facts)
    if facts.version:
        document = await run_in_threadpool(read_document, api, style)
        version = document.version(facts.version)
        answer["versionStatus"] = version.status.value if version else None
    return JSONResponse(answer)


async def cancel_training(api: Api, request: Request) -> Response:
    """Cancel a version's training: its Dagster run is terminated, which cancels the job.
    ---
    summary: Cancel a training
    responses: {200: {description: the runs terminated}, 409: {description: no active run trains it}}
    """
    style = style_of(request)
    document = await run_in_threadpool(read_document, api, style)
    version = resolve_version_ref(document, request.path_params["version"])
    runs = await run_in_threadpool(api.dagster.active_runs, style, version.name)
    if not runs:
        raise ApiError(
            409,
            f"{style} {version.name} is {version.status.value} and no active Dagster run trains it; nothing to cancel",
        )
    for run_id in runs:
        await run_in_threadpool(api.dagster.terminate, run_id)
    return JSONResponse({"style": style, "version": version.name, "terminatedRuns": runs})


ROUTES = [
    RouteSpec("/v1/styles/{style}/trainings", "POST", launch_training),
    RouteSpec("/v1/styles/{style}/trainings/{run_id}", "GET", show_training),
    RouteSpec("/v1/styles/{style}/trainings/{version}/cancel", "POST", cancel_training),
]
