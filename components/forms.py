"""Forms generated from config dataclasses (studio.config.field_docs): name, type, default, help, choices.

`SectionForm` renders one dataclass (model, data, train, generation settings); `MethodForm` renders
the union of every registered method's fields once and shows the selected method's fields with its
defaults, so a new method (or preset) needs no UI code. Values go back through the same docs, and
the engine's own validation (RunConfig.from_dict / method_config) has the last word.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import gradio as gr
import yaml

from studio.config import field_docs
from studio.errors import ConfigError, StudioError

REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


def label_of(name: str) -> str:
    return name.replace("_", " ").capitalize()


def choice_map(doc: dict) -> dict[str, Any]:
    """Dropdown label -> real value (choices may mix bools and strings: True vs 'true')."""
    return {str(c): c for c in doc.get("choices") or ()}


def to_display(doc: dict, value: Any) -> Any:
    """A field value as its input component shows it."""
    if doc.get("choices"):
        return str(value)
    kind = doc["type"]
    if kind in ("int", "float", "bool"):
        return value
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip() if value else ""
    return "" if value is None else str(value)


def to_value(doc: dict, raw: Any) -> Any:
    """What the input component holds, turned back into the field's value (None = keep the default)."""
    name, kind = doc["name"], doc["type"]
    if doc.get("choices"):
        return choice_map(doc).get(str(raw), raw)
    if raw is None or (kind in ("int", "float") and raw == ""):
        return None
    if kind == "int":
        return int(raw) if float(raw).is_integer() else raw
    if kind in ("float", "bool", "str"):
        return raw
    text = str(raw).strip()
    if kind == "list":
        return [v.strip() for v in text.split(",") if v.strip()]
    if kind == "dict":
        if not text:
            return {}
        try:
            value = yaml.safe_load(text if text.startswith("{") else "{" + text + "}")
        except yaml.YAMLError:
            raise ConfigError(f"{name} must look like `key: value, key2: value2`; got {text!r}.") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must look like `key: value, key2: value2`; got {text!r}.")
        return value
    # "any" (e.g. target_modules: list | str): a list where the default is one, unless it reads as a regex
    default = doc.get("default")
    if isinstance(default, (list, tuple)):
        if text.startswith("["):
            return yaml.safe_load(text)
        if text == "all-linear" or (REGEX_CHARS.search(text) and "," not in text):
            return text
        return [v.strip() for v in text.split(",") if v.strip()]
    try:
        return yaml.safe_load(text) if text else default
    except yaml.YAMLError:
        return text


def make_input(doc: dict, value: Any = None, visible: bool = True, **kw: Any) -> gr.components.Component:
    """One input for one field doc: Checkbox, Dropdown, Number or Textbox, labelled with its help line."""
    value = doc["default"] if value is None else value
    common = dict(label=label_of(doc["name"]), info=doc.get("help") or None, visible=visible,
                  elem_classes=["field", f"field-{doc['name']}"], **kw)
    if doc.get("choices"):
        return gr.Dropdown(choices=list(choice_map(doc)), value=to_display(doc, value), **common)
    kind = doc["type"]
    if kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if kind == "int":
        return gr.Number(value=value, precision=0, **common)
    if kind == "float":
        return gr.Number(value=value, step=_step(value), **common)
    return gr.Textbox(value=to_display(doc, value), **common)


def _step(value: Any) -> float:
    v = abs(float(value or 0))
    if v == 0 or v >= 1:
        return 0.1 if v < 1 else 1
    return 10 ** int(f"{v:e}".split("e")[1])


class SectionForm:
    """The fields of one config dataclass. `primary` fields show first; the rest go in an accordion."""

    def __init__(self, cls: type, section: str, primary: list[str] | None = None,
                 overrides: dict[str, Callable[[dict], gr.components.Component]] | None = None,
                 skip: tuple[str, ...] = (), only: list[str] | None = None, more_label: str | None = None,
                 columns: int = 3, defaults: dict | None = None):
        self.section = section
        self.docs = [d | ({"default": defaults[d["name"]]} if defaults and d["name"] in defaults else {})
                     for d in field_docs(cls) if d["name"] not in skip and (only is None or d["name"] in only)]
        self.primary = primary if primary is not None else [d["name"] for d in self.docs]
        self.overrides = overrides or {}
        self.more_label = more_label or f"More {section} settings"
        self.columns = columns
        self.comps: dict[str, gr.components.Component] = {}

    def _make(self, doc: dict) -> gr.components.Component:
        make = self.overrides.get(doc["name"])
        return make(doc) if make else make_input(doc)

    def render(self) -> "SectionForm":
        first = [d for d in self.docs if d["name"] in self.primary]
        first.sort(key=lambda d: self.primary.index(d["name"]))
        rest = [d for d in self.docs if d["name"] not in self.primary]
        self._grid(first)
        if rest:
            with gr.Accordion(self.more_label, open=False, elem_classes=["more"]):
                self._grid(rest)
        return self

    def _grid(self, docs: list[dict]) -> None:
        for i in range(0, len(docs), self.columns):
            with gr.Row(equal_height=True):
                for doc in docs[i:i + self.columns]:
                    self.comps[doc["name"]] = self._make(doc)

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.comps[d["name"]] for d in self.docs]

    def values(self, raw: list[Any]) -> dict:
        """Component values (in `inputs` order) -> {field: value}, leaving out blanks (= default)."""
        out = {}
        for doc, value in zip(self.docs, raw):
            v = to_value(doc, value)
            if v is not None:
                out[doc["name"]] = v
        return out

    def updates(self, values: dict) -> list[Any]:
        """gr.update per input showing `values` (e.g. a run's saved config)."""
        return [gr.update(value=to_display(d, values.get(d["name"], d["default"]))) for d in self.docs]


def safe_list_methods() -> list[dict]:
    """studio.methods.list_methods(); while the registry is being edited, the methods that do resolve."""
    from studio.methods import list_methods, method_config, presets, resolve
    try:
        return list_methods()
    except StudioError:
        rows = []
        for name, preset in sorted(presets().items()):
            try:
                method, fields = resolve(name)
                cfg = method_config({"name": name})
            except StudioError:
                continue
            docs = [d | {"default": getattr(cfg, d["name"])} for d in field_docs(method.config_cls)
                    if d["name"] != "name"]
            rows.append({"name": name, "base": method.name, "category": method.category,
                         "mergeable": method.mergeable, "summary": preset["summary"] or method.summary,
                         "preset_fields": fields, "fields": docs})
        return rows


CATEGORY_LABELS = {"reparameterised": "Reparameterised", "adapter": "Adapters", "soft_prompt": "Soft prompts",
                   "selective": "Selective", "hybrid": "Hybrid"}


def method_label(m: dict) -> str:
    preset = f" (preset of {m['base']})" if m["base"] != m["name"] else ""
    return f"{m['name']}{preset}"


class MethodForm:
    """Family radio + method dropdown + the union of all methods' fields (only the chosen one's visible)."""

    def __init__(self, methods: list[dict] | None = None, default: str = "lora"):
        self.methods = {m["name"]: m for m in (methods if methods is not None else safe_list_methods())}
        self.default = default if default in self.methods else next(iter(self.methods), "")
        self.keys: list[str] = []
        self.key_docs: dict[str, dict] = {}
        self.fields_of: dict[str, dict[str, str]] = {}  # method -> field name -> union key
        order = sorted(self.methods, key=lambda n: n != self.default)  # the default method's fields first
        for name in order:
            m = self.methods[name]
            own = {}
            for d in m["fields"]:
                key = f"{d['name']}:{d['type']}:{','.join(map(str, d.get('choices') or ()))}"
                if key not in self.key_docs:
                    self.keys.append(key)
                    self.key_docs[key] = d
                own[d["name"]] = key
            self.fields_of[name] = own
        self.comps: dict[str, gr.components.Component] = {}

    def categories(self) -> list[tuple[str, str]]:
        present = [c for c in CATEGORY_LABELS if any(m["category"] == c for m in self.methods.values())]
        counts = {c: sum(m["category"] == c for m in self.methods.values()) for c in present}
        return [(f"{CATEGORY_LABELS[c]} ({counts[c]})", c) for c in present]

    def choices(self, category: str) -> list[tuple[str, str]]:
        return [(method_label(m), n) for n, m in self.methods.items() if m["category"] == category]

    def render(self, columns: int = 3) -> "MethodForm":
        cat = self.methods[self.default]["category"] if self.default else None
        self.category = gr.Radio(self.categories(), value=cat, label="Family", elem_classes=["family"])
        self.name = gr.Dropdown(self.choices(cat) if cat else [], value=self.default, label="Method",
                                info="Presets (dora, qlora, ...) are a base method with some fields set",
                                elem_classes=["method-name"])
        self.about = gr.Markdown(self.describe(self.default), elem_classes=["method-about"])
        visible = self.fields_of.get(self.default, {})
        with gr.Row(equal_height=True, elem_classes=["method-fields"]):
            for key in self.keys:
                doc = self.key_docs[key]
                own = self.methods[self.default]["fields"] if key in visible.values() else []
                doc = next((d for d in own if d["name"] == doc["name"]), doc)
                self.comps[key] = make_input(doc, visible=key in visible.values(), min_width=200)
        # .input, not .change: only a person's pick resets the fields to a method's defaults, so loading a
        # saved run's method config into the form is not overwritten by the cascade.
        fields = [self.about, *self.field_inputs]
        self.category.input(self.on_category, self.category, self.name, show_progress="hidden").then(
            self.on_method, self.name, fields, show_progress="hidden")
        self.name.input(self.on_method, self.name, fields, show_progress="hidden")
        return self

    @property
    def field_inputs(self) -> list[gr.components.Component]:
        return [self.comps[k] for k in self.keys]

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [self.name, *self.field_inputs]

    def describe(self, name: str) -> str:
        m = self.methods.get(name)
        if not m:
            return ""
        merge = "mergeable into the base" if m["mergeable"] else "kept as a separate adapter (not mergeable)"
        preset = ""
        if m.get("preset_fields") and m["base"] != m["name"]:
            preset = " · sets " + ", ".join(f"`{k}={v}`" for k, v in m["preset_fields"].items())
        return f"**{m['name']}** — {m['summary']}  \n<small>{CATEGORY_LABELS.get(m['category'], '')} · {merge}{preset}</small>"

    def on_category(self, category: str):
        choices = self.choices(category)
        return gr.update(choices=choices, value=choices[0][1] if choices else None)

    def on_method(self, name: str) -> list[Any]:
        m = self.methods.get(name)
        own = {d["name"]: d for d in m["fields"]} if m else {}
        keys = self.fields_of.get(name, {})
        out: list[Any] = [self.describe(name)]
        for key in self.keys:
            doc = self.key_docs[key]
            if key in keys.values():
                d = own[doc["name"]]
                out.append(gr.update(visible=True, value=to_display(d, d["default"]), info=d.get("help") or None))
            else:
                out.append(gr.update(visible=False))
        return out

    def values(self, name: str, raw: list[Any]) -> dict:
        """{"name": method, field: value, ...} for studio.methods.method_config (only this method's fields)."""
        if name not in self.methods:
            raise ConfigError(f"Pick a method; {name!r} is not registered.")
        keys = self.fields_of[name]
        by_key = dict(zip(self.keys, raw))
        out: dict[str, Any] = {"name": name}
        for field, key in keys.items():
            v = to_value(self.key_docs[key] | {"default": _default(self.methods[name], field)}, by_key[key])
            if v is not None:
                out[field] = v
        return out

    def updates(self, cfg: dict) -> list[Any]:
        """Updates for [category, name, about, *fields] showing a saved method config."""
        name = cfg.get("name", self.default)
        m = self.methods.get(name)
        if not m:
            return [gr.skip()] * (3 + len(self.keys))
        keys = self.fields_of[name]
        out = [gr.update(value=m["category"]), gr.update(choices=self.choices(m["category"]), value=name),
               self.describe(name)]
        for key in self.keys:
            field = next((f for f, k in keys.items() if k == key), None)
            if field is None:
                out.append(gr.update(visible=False))
            else:
                out.append(gr.update(visible=True, value=to_display(self.key_docs[key],
                                                                    cfg.get(field, _default(m, field)))))
        return out


def _default(method: dict, field: str) -> Any:
    return next((d["default"] for d in method["fields"] if d["name"] == field), None)


class RunForm:
    """Model, data, method and train sections whose values make one RunConfig (engine-validated)."""

    def __init__(self, model: SectionForm, data: SectionForm, method: MethodForm, train: SectionForm):
        self.model, self.data, self.method, self.train = model, data, method, train

    @property
    def inputs(self) -> list[gr.components.Component]:
        return [*self.model.inputs, *self.data.inputs, *self.method.inputs, *self.train.inputs]

    def to_dict(self, values: list[Any] | tuple[Any, ...]) -> dict:
        values = list(values)
        out: dict[str, Any] = {}
        i = 0
        for sec in (self.model, self.data):
            n = len(sec.docs)
            out[sec.section] = sec.values(values[i:i + n])
            i += n
        n = len(self.method.keys)
        out["method"] = self.method.values(values[i], values[i + 1:i + 1 + n])
        i += 1 + n
        out["train"] = self.train.values(values[i:i + len(self.train.docs)])
        return out

    @property
    def load_outputs(self) -> list[gr.components.Component]:
        """What `load_updates` fills: every input plus the method family and description."""
        m = self.method
        return [*self.model.inputs, *self.data.inputs, m.category, m.name, m.about, *m.field_inputs,
                *self.train.inputs]

    def load_updates(self, cfg: dict) -> list[Any]:
        """Show a saved RunConfig (as a dict) in the form, e.g. to re-run a finished run with changes."""
        return [*self.model.updates(cfg["model"]), *self.data.updates(cfg["data"]),
                *self.method.updates(cfg["method"]), *self.train.updates(cfg["train"])]

    def to_config(self, values: list[Any] | tuple[Any, ...]):
        from studio.config import RunConfig
        return RunConfig.from_dict(self.to_dict(values))
