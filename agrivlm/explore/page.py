"""The field explorer page (Streamlit).

``app/field_explorer.py`` runs :func:`main`; this module can also be run directly as the Streamlit script
(``streamlit run agrivlm/explore/page.py -- --stack …``).

Layout: a sidebar with the stack's description, the date slider, the view (NDVI / true colour / false
colour / one band), layer switches and the field list; the map; then the selected field's NDVI curve with
its predicted and true growth stages, its details and the position tokens of its prediction; then, with
``--model``, the question box. Every input problem is one message in the page, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import altair as alt
import geopandas as gpd
import numpy as np
import pandas as pd
import streamlit as st

from agrivlm.errors import AgriVLMError
from agrivlm.explore.curves import ndvi_curve, stages_for
from agrivlm.explore.inputs import (
    ExploreError,
    MapLayer,
    read_map_layer,
    read_map_stages,
    split_inputs,
)
from agrivlm.explore.mapview import (
    MAP_HEIGHT_PX,
    PICK_LAYERS,
    build_deck,
    chip_grid_frame,
    fit_view,
    positions_layers,
    to_geojson,
)
from agrivlm.explore.overlay import NDVI_RANGE, Overlay, available_views, band_roles, legend_png, render_overlay
from agrivlm.explore.positions import (
    ChipPositions,
    ModelUnavailable,
    ask_model,
    check_model,
    chip_grid,
    decode_answer_text,
    positions_table,
    shapes_frame,
)
from agrivlm.explore.settings import ExploreSettings
from agrivlm.geo.coords import GeoGrid, TimeAxis
from agrivlm.geo.stack import Stack, open_stack
from agrivlm.schema import GROWTH_STAGES

log = logging.getLogger("agrivlm.explore")

#: Columns shown as a field's label (first found): land-use class names of parcel registers, crop names.
LABEL_COLUMNS: tuple[str, ...] = ("label", "crop", "crop_name", "LULC_NAME", "class", "name")


# -- loading (cached: the page re-runs on every click) -------------------------------------------------
@st.cache_resource(show_spinner="Opening the stack…")
def _stack(inputs: tuple[str, ...], masks: tuple[str, ...], assets: tuple[str, ...] = (),
           mask_assets: tuple[str, ...] = ()) -> Stack:
    return open_stack(list(inputs), masks=list(masks) or None, assets=list(assets) or None,
                      mask_assets=list(mask_assets) or None)


@st.cache_data(show_spinner="Rendering the date…", max_entries=64)
def _overlay(_stack_obj: Stack, key: tuple[Any, ...], step: int, view: str, roles: tuple[tuple[str, int], ...],
             clouds: bool) -> Overlay:
    return render_overlay(_stack_obj, step, view, dict(roles), show_clouds=clouds)


@st.cache_data(show_spinner=False, max_entries=32)
def _layer(path: str, crs_wkt: str, _grid: GeoGrid, kind: str, id_column: str | None) -> MapLayer:
    return read_map_layer(path, _grid, kind, id_column)  # type: ignore[arg-type]


@st.cache_data(show_spinner=False, max_entries=32)
def _stages(path: str) -> pd.DataFrame:
    return read_map_stages(path)


@st.cache_data(show_spinner="Reading the field's pixels…", max_entries=256)
def _curve(_stack_obj: Stack, key: tuple[Any, ...], field_key: str, _geometry: Any,
           roles: tuple[tuple[str, int], ...]) -> pd.DataFrame:
    return ndvi_curve(_stack_obj, _geometry, dict(roles))


@dataclass
class Inputs:
    """Everything loaded for one page run; problems are collected, not raised."""

    stack: Stack
    layers: list[MapLayer] = field(default_factory=list)
    stage_tables: dict[str, list[pd.DataFrame]] = field(default_factory=lambda: {"predicted": [], "true": []})
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fields(self, kind: str) -> gpd.GeoDataFrame | None:
        """All polygons of one kind (stack CRS), or ``None`` when there are none."""
        frames = [layer.frame for layer in self.layers if (layer.frame["kind"] == kind).any()]
        if not frames:
            return None
        return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)


def load_inputs(settings: ExploreSettings) -> Inputs:
    """Open the stack (an error stops the page) and read the optional layers and tables (errors are listed)."""
    stack = _stack(settings.stack, settings.masks, settings.assets, settings.mask_assets)
    inputs = Inputs(stack=stack)
    sources = (("predicted", settings.predictions, "--predictions"), ("true", settings.truth, "--truth"))
    for kind, paths, option in sources:
        try:
            layer_paths, table_paths = split_inputs(paths, option)
        except ExploreError as exc:
            inputs.errors.append(str(exc))
            layer_paths, table_paths = _existing(paths)
        for path in layer_paths:
            try:
                layer = _layer(str(path), stack.crs.to_wkt(), stack.grid, kind,
                               settings.truth_id if kind == "true" else None)
            except AgriVLMError as exc:
                inputs.errors.append(str(exc))
                continue
            inputs.layers.append(layer)
            inputs.notes.extend(f"{path.name}: {note}" for note in layer.notes)
        for path in table_paths:
            try:
                inputs.stage_tables[kind].append(_stages(str(path)))
            except AgriVLMError as exc:
                inputs.errors.append(str(exc))
    return inputs


def _existing(paths: Sequence[str]) -> tuple[list[Any], list[Any]]:
    # After a bad path, keep going with the paths that are fine.
    from pathlib import Path

    layers, tables = [], []
    for item in paths:
        try:
            a, b = split_inputs([item], "")
        except ExploreError:
            continue
        layers += a
        tables += b
    return [Path(p) for p in layers], [Path(p) for p in tables]


# -- helpers ------------------------------------------------------------------------------------------
def field_labels(frame: gpd.GeoDataFrame) -> pd.Series:
    """A short label per field: the first label-like column, or task and score for predictions."""
    for column in LABEL_COLUMNS:
        if column in frame.columns:
            return frame[column].astype(object).fillna("").astype(str)  # a category column has no "" category
    if {"task", "score"} <= set(frame.columns):
        score = pd.to_numeric(frame["score"], errors="coerce").round(2).astype(str)
        return frame["task"].astype(str) + " · score " + score
    return pd.Series([""] * len(frame), index=frame.index)


def field_options(inputs: Inputs) -> dict[str, str]:
    """Field choices ``{"true:<id>": "true · <id> · <label>", ...}`` in layer order."""
    options: dict[str, str] = {}
    for kind in ("true", "predicted"):
        frame = inputs.fields(kind)
        if frame is None:
            continue
        for fid, label in zip(frame["field_id"], field_labels(frame), strict=True):
            options[f"{kind}:{fid}"] = f"{kind} · {fid}" + (f" · {label}" if label else "")
    return options


def picked_field(selection: Any) -> str | None:
    """The ``"kind:id"`` of the field clicked on the map, from the chart's selection state."""
    if not selection:
        return None
    try:
        objects = selection["selection"]["objects"]
    except (KeyError, TypeError):
        return None
    for kind, layer_id in PICK_LAYERS.items():
        for obj in objects.get(layer_id, []) or []:
            props = obj.get("properties", obj) if isinstance(obj, dict) else {}
            if "field_id" in props:
                return f"{kind}:{props['field_id']}"
    return None


#: Growth-stage colours, in phenological order: brown (dormant) → light green → dark green → orange → grey.
_STAGE_COLOURS = ("#8d6e63", "#9ccc65", "#1b5e20", "#ef6c00", "#757575")
#: Heights (in NDVI units, above the NDVI range) of the predicted and true growth-stage rows.
_STAGE_ROWS = {"predicted": NDVI_RANGE[1] + 0.1, "true": NDVI_RANGE[1] + 0.22}


def curve_chart(curve: pd.DataFrame, stages: pd.DataFrame, current: pd.Timestamp | None) -> alt.LayerChart:
    """The field's NDVI over the dates, with its growth stages in two rows above the curve.

    Clear dates are joined by a line, cloudy dates are grey dots, a dashed rule marks the date shown on the
    map; predicted stages are triangles and true stages circles, coloured by stage, in rows above NDVI 1.
    """
    x = alt.X("date:T", title=None)
    ticks = [round(v, 1) for v in np.arange(NDVI_RANGE[0], NDVI_RANGE[1] + 1e-9, 0.2)]
    y_scale = alt.Scale(domain=[NDVI_RANGE[0], NDVI_RANGE[1] + (0.3 if not stages.empty else 0.02)])
    y = alt.Y("ndvi:Q", title="NDVI (field mean)", scale=y_scale, axis=alt.Axis(values=ticks))
    tooltip = [alt.Tooltip("date:T", format="%Y-%m-%d"), alt.Tooltip("ndvi:Q", format=".3f"),
               alt.Tooltip("clear_fraction:Q", format=".0%", title="clear")]
    base = alt.Chart(curve)
    green = "#2e7d32"
    line = base.transform_filter("datum.used").mark_line(
        color=green, point=alt.OverlayMarkDef(color=green, size=30)).encode(x=x, y=y, tooltip=tooltip)
    cloudy = base.transform_filter("!datum.used && isValid(datum.ndvi)").mark_point(color="#9e9e9e").encode(
        x=x, y=y, tooltip=tooltip)
    layers: list[alt.Chart] = [line, cloudy]
    if current is not None:
        rule = alt.Chart(pd.DataFrame({"date": [current]})).mark_rule(color="#555", strokeDash=[4, 3])
        layers.append(rule.encode(x=x))
    if not stages.empty:
        rows = stages.assign(row=stages["source"].map(_STAGE_ROWS))
        layers.append(alt.Chart(rows).mark_point(size=130, filled=True, opacity=1).encode(
            x=x,
            y=alt.Y("row:Q", scale=y_scale),
            color=alt.Color("stage:N", title="growth stage",
                            scale=alt.Scale(domain=list(GROWTH_STAGES), range=list(_STAGE_COLOURS)),
                            legend=alt.Legend(orient="bottom", columns=5)),
            shape=alt.Shape("source:N", scale=alt.Scale(domain=["predicted", "true"], range=["triangle-up", "circle"]),
                            legend=None),
            tooltip=[alt.Tooltip("date:T", format="%Y-%m-%d"), "stage:N", "source:N"],
        ))
    return alt.LayerChart(layer=layers)


# -- the page -----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the Streamlit script: parse the script's arguments and render the page."""
    st.set_page_config(page_title="agrivlm field explorer", layout="wide")
    try:
        settings = ExploreSettings.from_argv(sys.argv[1:] if argv is None else argv)
    except ExploreError as exc:
        st.error(str(exc))
        return
    render(settings)


def render(settings: ExploreSettings) -> None:
    """Render the page for ``settings``: agrivlm's errors as messages, anything else as a generic one."""
    try:
        _render(settings)
    except AgriVLMError as exc:
        st.error(str(exc))
    except Exception:  # the page must never show a traceback; the terminal gets it
        log.exception("field explorer: unexpected error")
        st.error("Something unexpected went wrong while drawing the page; the details are in the terminal "
                 "where `agrivlm explore` runs.")


def _render(settings: ExploreSettings) -> None:
    st.title(settings.title)
    inputs = load_inputs(settings)
    stack = inputs.stack
    roles = band_roles(stack.band_names, settings.band_map())
    views = available_views(stack.band_names, roles)
    options = field_options(inputs)
    _follow_map_pick(options)
    controls = _sidebar(settings, inputs, views, options)
    _input_messages(inputs)

    stack_key = (settings.stack, settings.masks)
    roles_key = tuple(sorted(roles.items()))
    overlay = _overlay(stack, stack_key, controls.step, controls.view, roles_key,
                       bool(controls.show_clouds and stack.has_masks))
    view_state = fit_view(_stack_lonlat_bounds(stack))

    selected = _selected(inputs, controls.choice)
    answer_layers, position_panel = _positions(settings, stack, selected)
    answer_layers += _model_answer_layers(settings, stack)
    _draw_map(settings, inputs, controls, view_state, overlay, selected, answer_layers)
    _map_caption(settings, stack, controls, overlay)

    if selected is None:
        st.info("Click a field on the map or pick one in the sidebar to see its NDVI curve and growth stages.")
    else:
        _field_panel(stack, selected, inputs, roles_key, stack_key, controls.dates[controls.step], position_panel)
    if settings.model is not None:
        _question_box(settings, stack, selected)


@dataclass
class _Controls:
    """The sidebar's choices of one page run, with the stack's dates they index."""

    dates: pd.DatetimeIndex
    labels: list[str]
    step: int
    view: str
    show_truth: bool
    show_pred: bool
    show_grid: bool
    show_clouds: bool
    choice: str | None


def _follow_map_pick(options: dict[str, str]) -> None:
    """Select the field clicked on the map."""
    # A click on the map (the chart's state, known before anything is drawn) selects that field.
    picked = picked_field(st.session_state.get("map"))
    if picked != st.session_state.get("_last_pick"):
        st.session_state["_last_pick"] = picked  # a cleared selection re-arms a click on the same field
        if picked in options:
            st.session_state["field"] = picked


def _sidebar(settings: ExploreSettings, inputs: Inputs, views: Sequence[str], options: dict[str, str]) -> _Controls:
    """The stack's description, the date slider, the view, the layer switches and the field list."""
    stack = inputs.stack
    with st.sidebar:
        t, c, h, w = stack.shape
        dates = pd.to_datetime(stack.times)
        st.markdown(f"**Stack** · {t} dates, {dates[0]:%Y-%m-%d} → {dates[-1]:%Y-%m-%d}  \n"
                    f"{c} band(s): {', '.join(stack.band_names)} · {h}×{w} px · {stack.crs.to_string()}"
                    + ("  \ncloud masks: yes" if stack.has_masks else "  \ncloud masks: none given"))
        labels = [f"{d:%Y-%m-%d %H:%M}" for d in dates]
        step = st.select_slider("Date", options=list(range(t)), format_func=lambda i: labels[i], key="date")
        view = st.radio("Show", views, key="view", horizontal=False)
        show_truth = st.checkbox("True fields (cyan)", value=True, disabled=inputs.fields("true") is None)
        show_pred = st.checkbox("Predicted fields (magenta)", value=True, disabled=inputs.fields("predicted") is None)
        show_grid = st.checkbox(f"Chip grid ({settings.chip_size} px)", value=False, key="grid")
        show_clouds = st.checkbox("Mark clouds (blue-grey)", value=True, disabled=not stack.has_masks)
        choice = st.selectbox("Field", [""] + list(options), format_func=lambda k: options.get(k, "— none —"),
                              key="field", help="Or click a field on the map.")
    return _Controls(dates=dates, labels=labels, step=step, view=view, show_truth=show_truth, show_pred=show_pred,
                     show_grid=show_grid, show_clouds=show_clouds, choice=choice)


def _input_messages(inputs: Inputs) -> None:
    """The inputs' problems as errors, and what was done to them in a folded list of notes."""
    for message in inputs.errors:
        st.error(message)
    if inputs.notes:
        with st.expander(f"Notes on the inputs ({len(inputs.notes)})"):
            for note in inputs.notes:
                st.write("· " + note)


def _draw_map(settings: ExploreSettings, inputs: Inputs, controls: _Controls, view_state: dict[str, float],
              overlay: Overlay, selected: gpd.GeoDataFrame | None, answer_layers: list[Any]) -> None:
    """The map: the date's overlay, the switched-on field layers, the chip grid and the selection."""
    stack = inputs.stack
    truth_json = _geojson(inputs.fields("true")) if controls.show_truth else None
    pred_json = _geojson(inputs.fields("predicted")) if controls.show_pred else None
    grid_json = None
    if controls.show_grid:
        grid_json = to_geojson(chip_grid_frame(stack.grid, settings.chip_size, settings.stride), ["chip_id"])
    selected_json = _geojson(selected) if selected is not None else None
    deck = build_deck(view_state, overlay, truth_json, pred_json, grid_json, selected_json, answer_layers,
                      settings.tiles)
    st.pydeck_chart(deck, on_select="rerun", selection_mode="single-object", key="map", height=MAP_HEIGHT_PX)


def _map_caption(settings: ExploreSettings, stack: Stack, controls: _Controls, overlay: Overlay) -> None:
    """What the map shows (date, view, data and cloud cover) beside the view's colour bar."""
    label = controls.labels[controls.step]
    legend = legend_png(controls.view)
    cols = st.columns([3, 2])
    cols[0].caption(
        f"{label} · {controls.view} · data on {overlay.valid_fraction:.0%} of the stack"
        + (f", clouds on {overlay.cloud_fraction:.0%} of it" if stack.has_masks else "")
        + " · no basemap" * (settings.tiles is None)
    )
    if overlay.valid_fraction == 0:
        st.warning(f"The stack has no data on {label}: pick another date.")
    if legend is not None:
        cols[1].image(legend)


def _stack_lonlat_bounds(stack: Stack) -> tuple[float, float, float, float]:
    corners = stack.grid.corners()
    lon, lat = stack.grid.crs_to_lonlat(corners[:, 0], corners[:, 1])
    return float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max())


def _geojson(frame: gpd.GeoDataFrame | None) -> dict[str, Any] | None:
    if frame is None or frame.empty:
        return None
    return to_geojson(frame.assign(label=field_labels(frame)), ["field_id", "kind", "label"])


def _selected(inputs: Inputs, choice: str | None) -> gpd.GeoDataFrame | None:
    if not choice or ":" not in choice:
        return None
    kind, fid = choice.split(":", 1)
    frame = inputs.fields(kind)
    if frame is None:
        return None
    rows = frame[frame["field_id"] == fid]
    return rows.iloc[:1] if not rows.empty else None


def _positions(settings: ExploreSettings, stack: Stack, selected: gpd.GeoDataFrame | None) -> tuple[list[Any], Any]:
    """Map layers and a panel-drawing function for the selected prediction's position tokens."""
    if selected is None or selected["kind"].iloc[0] != "predicted":
        return [], None
    row = selected.iloc[0]
    tokens = str(row.get("tokens", "") or "")
    try:
        positions = decode_answer_text(tokens, str(row["chip_id"]))
        grid = chip_grid(stack.grid, str(row["chip_id"]), settings.chip_size)
        table = positions_table(grid, TimeAxis.from_dates(stack.times), positions)
    except ExploreError as exc:
        error = str(exc)
        return [], lambda: st.error(error)
    if table.empty:

        def raw_panel() -> None:
            st.info("This prediction holds no position token. Its raw tokens:")
            st.code(tokens or "(none)", language=None)

        return [], raw_panel

    def table_panel() -> None:
        st.dataframe(table, hide_index=True)

    return _layers(grid, positions, table, "answer"), table_panel


def _layers(grid: GeoGrid, positions: ChipPositions, table: pd.DataFrame, prefix: str) -> list[Any]:
    shapes = shapes_frame(grid, positions)
    boxes = to_geojson(shapes, ["label"]) if not shapes.empty else None
    return positions_layers(table[table["kind"] == "point"], boxes, prefix)


#: Session keys of the last model answer (kept across the rerun that draws it on the map).
_ANSWER = "model_answer"


def _model_answer_layers(settings: ExploreSettings, stack: Stack) -> list[Any]:
    """The last model answer's positions on the map (the question box stores it and reruns the page)."""
    stored = st.session_state.get(_ANSWER)
    if settings.model is None or not stored:
        return []
    try:
        grid = chip_grid(stack.grid, stored["chip"], settings.chip_size)
    except ExploreError:
        return []
    positions = stored["answer"].positions
    return _layers(grid, positions, stored["table"], "model-answer")


def _field_panel(stack: Stack, selected: gpd.GeoDataFrame, inputs: Inputs, roles_key: tuple[tuple[str, int], ...],
                 stack_key: tuple[Any, ...], current: pd.Timestamp, position_panel: Any) -> None:
    row = selected.iloc[0]
    kind, fid = str(row["kind"]), str(row["field_id"])
    label = field_labels(selected).iloc[0]
    st.subheader(f"Field {fid} ({kind})" + (f" · {label}" if label else ""))
    left, right = st.columns([3, 2])
    stages = stages_for(fid, inputs.stage_tables)
    try:
        curve = _curve(stack, stack_key, f"{kind}:{fid}:{row.geometry.wkb_hex}", row.geometry, roles_key)
    except ExploreError as exc:
        left.error(f"No NDVI curve for field {fid}: {exc}")
        curve = None
    if curve is not None:
        left.altair_chart(curve_chart(curve, stages, current), width="stretch", height=360)
        used = int(curve["used"].sum())
        n_pixels = int(curve["n_pixels"].iloc[0])
        left.caption(f"{used} of {len(curve)} dates clear enough (≥ 50 % of the field's {n_pixels} "
                     "pixels without cloud or gap); grey dots: cloudy dates."
                     + (" Above the curve: predicted stages ▲ (lower row), true stages ● (upper row)."
                        if not stages.empty else ""))
        left.download_button("NDVI curve (CSV)", curve.to_csv(index=False).encode(), file_name=f"ndvi_{fid}.csv",
                             mime="text/csv")
    with right:
        area_ha = float(row.geometry.area) / 1e4 if stack.crs.is_projected else None
        facts = {"field id": fid, "layer": kind}
        if area_ha is not None:
            facts["area"] = f"{area_ha:.2f} ha"
        for column in ("task", "score", "chip_id"):
            if column in selected.columns:
                facts[column] = str(row[column])
        st.table(pd.DataFrame({"": list(facts), "value": list(facts.values())}).set_index(""))
        if stages.empty:
            st.caption("No growth stages for this field in the given tables.")
        else:
            wide = stages.assign(date=stages["date"].dt.strftime("%Y-%m-%d")).pivot_table(
                index="date", columns="source", values="stage", aggfunc="first").reset_index().fillna("")
            st.markdown("**Growth stages**")
            st.dataframe(wide, hide_index=True)
        if position_panel is not None:
            st.markdown("**Position tokens**")
            position_panel()


def _question_box(settings: ExploreSettings, stack: Stack, selected: gpd.GeoDataFrame | None) -> None:
    st.subheader("Ask the model about a chip")
    chips = chip_grid_frame(stack.grid, settings.chip_size, settings.stride)
    default = 0
    if selected is not None:
        hits = chips.index[chips.geometry.contains(selected.geometry.iloc[0].representative_point())]
        default = int(hits[0]) if len(hits) else 0
    chip = st.selectbox("Chip", list(chips["chip_id"]), index=default, key="chip")
    assert settings.model is not None
    try:
        check_model(settings.model)
        ready, reason = True, ""
    except ModelUnavailable as exc:
        ready, reason = False, str(exc)
    if not ready:
        st.info(f"Asking needs a trained checkpoint: {reason}.")
    question = st.text_input("Question", key="question", disabled=not ready,
                             placeholder="Outline every field in this image.")
    if ready and question and st.button("Ask", key="ask"):
        try:
            with st.spinner("The model is answering…"):
                answer = ask_model(settings.model, stack, chip, question, settings.chip_size)
            grid = chip_grid(stack.grid, chip, settings.chip_size)
            table = positions_table(grid, answer.time_axis, answer.positions)
        except ExploreError as exc:
            st.error(str(exc))
        else:
            st.session_state[_ANSWER] = {"chip": chip, "question": question, "answer": answer, "table": table}
            st.rerun()  # draw the answer's positions on the map, which is above this box
    stored = st.session_state.get(_ANSWER)
    if stored and stored["chip"] == chip and stored["question"] == question:
        answer = stored["answer"]
        st.markdown(f"**Answer** (score {answer.score:.2f}; frames {answer.frame_dates[0]} → "
                    f"{answer.frame_dates[-1]}):")
        st.code(answer.text or "(empty)", language=None)
        if stored["table"].empty:
            st.caption("The answer holds no position.")
        else:
            st.caption("Its positions, orange on the map (boxes as outlines, corners as numbered dots):")
            st.dataframe(stored["table"], hide_index=True)


if __name__ == "__main__":
    main()
