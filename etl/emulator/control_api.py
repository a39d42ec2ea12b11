"""The `/_emulator/` endpoints through which tests steer the emulator: its clock, its faults, its ledger,
the live path's limits, a reset. `EmulatorControl` (control.py) is their client."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from etl import codec
from etl.emulator.clock import format_time
from etl.emulator.faults import FaultConfigError
from etl.emulator.limits import LiveSettings
from etl.emulator.state import ApiError

if TYPE_CHECKING:
    from etl.emulator.server import EmulatorServer


def json_body(body: bytes) -> Any:
    """A request's JSON, or the API's 400."""
    try:
        return codec.loads(body)  # orjson (a 100,000-request create is 130 MB), else json as before
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_request_error", f"The request body is not valid JSON: {exc}") from exc


def answer(emulator: EmulatorServer, method: str, path: str, body: bytes) -> Any:
    """The JSON answer (status 200) to a control request; `ApiError` for a bad one."""
    state = emulator.state
    if path == "/_emulator/clock" and method in ("GET", "POST"):
        if method == "POST":
            _advance(emulator, json_body(body) if body else {})
        return {"now": format_time(state.settle())}
    if path == "/_emulator/faults":
        if method == "POST":
            try:
                emulator.faults.configure(json_body(body), "replace")
            except FaultConfigError as exc:
                raise ApiError(400, "invalid_request_error", str(exc)) from exc
        elif method == "DELETE":
            emulator.faults.clear()
        return emulator.faults.to_json()
    if path == "/_emulator/ledger" and method == "GET":
        return state.ledger_json()
    if path == "/_emulator/live":
        if method == "POST":
            doc = json_body(body) if body else {}
            try:
                settings = LiveSettings.from_json(doc if isinstance(doc, dict) else {"?": doc})
            except ValueError as exc:
                raise ApiError(400, "invalid_request_error", str(exc)) from exc
            emulator.limits.configure(settings)
        return emulator.limits.settings.to_json()
    if path == "/_emulator/reset" and method == "POST":
        state.reset()
        emulator.limits.reset()
        return {"reset": True}
    raise ApiError(404, "not_found_error", f"Not found: {method} {path}")


def _advance(emulator: EmulatorServer, doc: Any) -> None:
    seconds = doc.get("advance_seconds", 0) if isinstance(doc, dict) else None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        raise ApiError(400, "invalid_request_error", "advance_seconds must be a number >= 0")
    emulator.clock.advance(float(seconds))
