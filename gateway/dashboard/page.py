"""The dashboard page: one HTML document with inline CSS and a small script, no build step.

The server embeds the current snapshot as a JSON data block, so the first paint needs no
round trip; the script renders it and then polls the JSON endpoint. All caller text goes
into the DOM through text nodes (never innerHTML), and the Content-Security-Policy only
runs the script carrying this response's nonce: a stray tag in a transcript stays text.
"""

from __future__ import annotations

from typing import Any

import orjson

REFRESH_MS = 3000

# `<`, `>` and `&` only ever occur inside JSON strings, so their \u escapes keep the JSON
# identical while no `</script>` or `<!--` can end the data block early.
_JSON_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def embed_json(data: Any) -> str:
    return orjson.dumps(data).decode().translate(_JSON_ESCAPES)


def render(snapshot: dict[str, Any], nonce: str, data_url: str) -> str:
    # The data goes in last, so nothing a caller said can be mistaken for a placeholder.
    page = (
        _PAGE.replace("__NONCE__", nonce)
        .replace("__DATA_URL__", data_url)
        .replace("__REFRESH_MS__", str(REFRESH_MS))
    )
    return page.replace("__SNAPSHOT__", embed_json(snapshot))


def content_security_policy(nonce: str) -> str:
    return (
        "default-src 'none'; "
        f"script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


_PAGE = """<!doctype html>
<html lang="pt-BR">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<meta name="robots" content="noindex">
<title>Almada · painel do gateway</title>
<style nonce="__NONCE__">
:root { --fg: #1d2430; --muted: #667085; --line: #e4e7ec; --bg: #f6f7f9; --card: #fff;
        --accent: #1f6feb; --good: #12805c; --bad: #c4320a; --user: #eef4ff; --bot: #f2f4f7; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--fg); background: var(--bg); }
header { display: flex; align-items: baseline; gap: 16px; padding: 14px 24px;
         background: #101828; color: #fff; }
header h1 { margin: 0; font-size: 18px; font-weight: 600; }
header .stamp { margin-left: auto; font-size: 12px; color: #d0d5dd; }
header .stamp.error { color: #fda29b; }
main { padding: 16px 24px 40px; display: grid; gap: 16px;
       grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
          padding: 14px 16px; min-width: 0; }
section.wide { grid-column: 1 / -1; }
h2 { margin: 0 0 10px; font-size: 15px; }
h3 { margin: 0; font-size: 14px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(140px, 1fr)); gap: 8px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; }
.card .label { font-size: 12px; color: var(--muted); }
.card .value { font-size: 15px; font-weight: 600; overflow-wrap: anywhere; }
.good { color: var(--good); } .bad { color: var(--bad); }
.badge { display: inline-block; padding: 0 6px; border-radius: 9px; font-size: 11px;
         background: #fef0c7; color: #93370d; font-weight: 600; vertical-align: middle; }
.badge.live { background: #d1fadf; color: #05603a; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { font-size: 12px; color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 12px; }
.empty { color: var(--muted); font-style: italic; margin: 4px 0; }
svg.histogram { width: 100%; height: auto; margin-top: 10px; }
svg .bar { fill: var(--accent); } svg .axis { stroke: #98a2b3; }
svg text { font-size: 11px; fill: var(--muted); text-anchor: middle; }
svg text.count { fill: var(--fg); }
.caption { font-size: 12px; color: var(--muted); }
.person { border-top: 1px solid var(--line); padding: 10px 0; }
.person:first-of-type { border-top: 0; }
.person .who { display: flex; gap: 8px; align-items: baseline; margin-bottom: 4px; }
.person .number { color: var(--muted); font-variant-numeric: tabular-nums; }
details { margin: 4px 0 4px 8px; }
summary { cursor: pointer; color: var(--fg); }
ol.transcript { list-style: none; margin: 6px 0; padding: 0; display: grid; gap: 4px; }
ol.transcript li { padding: 5px 8px; border-radius: 6px; background: var(--bot);
                   white-space: pre-wrap; overflow-wrap: anywhere; }
ol.transcript li.user { background: var(--user); }
ol.transcript .role { font-weight: 600; margin-right: 6px; }
ol.transcript .meta { color: var(--muted); font-size: 12px; margin-left: 6px; }
p.alert { color: var(--bad); font-weight: 600; }
</style>
</head>
<body>
<header>
  <h1>Almada · painel do gateway</h1>
  <span id="stamp" class="stamp">carregando…</span>
</header>
<noscript><p>Este painel precisa de JavaScript; os dados brutos estão em
<code>__DATA_URL__</code>.</p></noscript>
<main>
  <section id="health"><h2>Saúde</h2><div class="body"></div></section>
  <section id="latency"><h2>Latência (turnos recentes)</h2><div class="body"></div></section>
  <section id="limits" class="wide"><h2>Limites e alertas</h2><div class="body"></div></section>
  <section id="leads" class="wide"><h2>Leads</h2><div class="body"></div></section>
  <section id="calls" class="wide"><h2>Chamadas ao vivo</h2><div class="body"></div></section>
  <section id="people" class="wide"><h2>Conversas recentes</h2><div class="body"></div></section>
</main>
<script id="snapshot" type="application/json">__SNAPSHOT__</script>
<script nonce="__NONCE__">
"use strict";
(() => {
  const DATA_URL = "__DATA_URL__";
  const REFRESH_MS = __REFRESH_MS__;
  const SVG = "http://www.w3.org/2000/svg";
  const ROLES = { user: "Pessoa", assistant: "Clone", dtmf: "Tecla", system: "Sistema" };
  const CHANNELS = { call: "Chamada", whatsapp: "WhatsApp" };
  const INTERESTS = { advertising: "Publicidade", digital_marketing: "Marketing digital",
                      ai: "IA", real_estate: "Imobiliário", agribusiness: "Agronegócio",
                      other: "Outro" };
  const CRM_STATES = { delivered: "entregue", pending: "na fila", retrying: "tentando de novo",
                       failed: "não entregue", not_queued: "sem CRM" };
  const opened = new Map();  // conversation id -> open?, as the person left it
  const shown = {};          // section -> JSON last drawn, to leave unchanged ones alone

  // Every value reaches the DOM as a text node or an attribute value, never as markup.
  function make(ns, tag, attrs, children) {
    const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) {
        node.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of [].concat(children ?? []).flat(Infinity)) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const h = (tag, attrs, children) => make(null, tag, attrs, children);
  const s = (tag, attrs, children) => make(SVG, tag, attrs, children);

  const pad = (n) => String(n).padStart(2, "0");
  const ms = (v) => (v === null || v === undefined ? "—" : `${Math.round(v)} ms`);
  function clock(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const t = Math.floor(seconds);
    const hours = Math.floor(t / 3600);
    const rest = `${pad(Math.floor((t % 3600) / 60))}:${pad(t % 60)}`;
    return hours ? `${hours}:${rest}` : rest;
  }
  function when(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return d.toLocaleString("pt-BR", { day: "2-digit", month: "2-digit",
                                       hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function table(headers, rows) {
    const head = h("tr", {}, headers.map(([label, cls]) => h("th", { class: cls }, label)));
    const body = rows.map((cells) => h("tr", {}, cells.map(([value, cls]) =>
      h("td", { class: cls }, value))));
    return h("table", {}, [h("thead", {}, head), h("tbody", {}, body)]);
  }

  function renderHealth(hh) {
    const card = (label, value, cls) =>
      h("div", { class: "card" }, [h("div", { class: "label" }, label),
                                   h("div", { class: `value ${cls || ""}` }, value)]);
    const ok = hh.status === "ok";
    return h("div", { class: "cards" }, [
      card("Estado", ok ? "ok" : "degradado", ok ? "good" : "bad"),
      card("Banco de dados", hh.store.reachable ? "acessível" : "inacessível",
        hh.store.reachable ? "good" : "bad"),
      card("Realtime", `${hh.realtime.backend} · ${hh.realtime.model} · ${hh.realtime.voice}`),
      card("Twilio", hh.twilio.backend),
      card("Instância", hh.instance.id),
      card("Instâncias no ar", (hh.instances || []).map((i) => i.id).join(", ") || "—"),
      card("No ar há", clock(hh.uptime_s)),
      card("Versão", hh.sandbox ? [hh.version, " ", h("span", { class: "badge" }, "sandbox")]
                                : hh.version),
    ]);
  }

  function renderLimits(lim) {
    const N = "num";
    const usd = (v) => `US$ ${Number(v).toFixed(2)}`;
    const set = h("p", {}, [
      `WhatsApp: ${lim.whatsapp_burst} respostas de uma vez, ${lim.whatsapp_per_hour} por hora `,
      `por pessoa · orçamento diário por pessoa: `,
      lim.daily_budget_usd > 0 ? usd(lim.daily_budget_usd) : "desligado",
      ` · chamadas ao vivo no máximo: ${lim.max_live_calls}`,
      ` · sessões pré-abertas no máximo: ${lim.max_parked_calls}`,
    ]);
    if (!lim.alerts.length) {
      return h("div", {}, [set, h("p", { class: "empty" }, "Nenhum alerta de orçamento hoje.")]);
    }
    const alerts = table(
      [["Quando"], ["Número"], ["Canal"], ["Gasto hoje", N]],
      lim.alerts.map((a) => [[when(a.at)], [a.number], [CHANNELS[a.channel] ?? a.channel],
                             [usd(a.spent_usd), N]]));
    return h("div", {}, [set, h("p", { class: "alert" }, "Orçamento diário atingido:"), alerts]);
  }

  function renderLeads(ld) {
    const outbox = h("p", {}, [
      ld.crm ? "CRM ligado"
             : "CRM não configurado (CRM_WEBHOOK_URL): os leads ficam aqui e no CSV",
      ` · na fila para o CRM: ${ld.pending}`,
      ld.failed ? h("span", { class: "bad" }, ` · não entregues (desistiu): ${ld.failed}`) : null,
    ]);
    const csv = h("p", { class: "caption" },
                  ["Todos os leads: ", h("code", {}, "/admin/leads.csv")]);
    if (!ld.latest.length) {
      return h("div", {}, [outbox, h("p", { class: "empty" }, "Nenhum lead ainda."), csv]);
    }
    const leads = table(
      [["Quando"], ["Nome"], ["Número"], ["Interesse"], ["Cidade"], ["Canal"], ["CRM"]],
      ld.latest.map((l) => [[when(l.updated_at)], [l.name], [l.number],
                            [INTERESTS[l.interest] ?? l.interest], [l.city ?? "—"],
                            [CHANNELS[l.channel] ?? l.channel],
                            [CRM_STATES[l.crm_status] ?? l.crm_status,
                             l.crm_status === "failed" ? "bad" : null]]));
    return h("div", {}, [outbox, leads, csv]);
  }

  function renderCalls(calls) {
    if (!calls.length) return h("p", { class: "empty" }, "Nenhuma chamada agora.");
    const N = "num";
    return table(
      [["CallSid"], ["Número"], ["Nome"], ["Duração", N], ["Turnos", N],
       ["Última latência", N], ["Saudação", N], ["Reconexões", N]],
      calls.map((c) => [[h("code", {}, c.call_sid)], [c.number ?? "oculto"], [c.name ?? "—"],
                        [clock(c.duration_s), N], [c.turns, N], [ms(c.last_latency_ms), N],
                        [ms(c.greeting_ms), N], [c.reconnects, N]]));
  }

  function renderLatency(lat) {
    const N = "num";
    const row = (label, x) => [[label], [x.count, N], [ms(x.p50), N], [ms(x.p95), N],
                               [ms(x.p99), N]];
    return h("div", {}, [
      table([["Medida"], ["n", N], ["p50", N], ["p95", N], ["p99", N]], [
        row("Fim da fala → 1º quadro da resposta", lat.response),
        row("Saudação (início do stream → 1º quadro)", lat.greeting),
        row("1º áudio do upstream (Realtime)", lat.upstream),
      ]),
      histogram(lat.histogram),
      h("div", { class: "caption" },
        "Histograma: fim da fala → 1º quadro da resposta (ms; cada barra vai de um limite " +
        "ao seguinte, a última não tem fim)."),
    ]);
  }

  function histogram(hist) {
    const W = 640, H = 200, TOP = 18, BOTTOM = 26, SIDE = 16;
    const n = hist.counts.length;
    const max = Math.max(1, ...hist.counts);
    const step = (W - 2 * SIDE) / n;
    const base = H - BOTTOM;
    const svg = s("svg", { class: "histogram", viewBox: `0 0 ${W} ${H}`, role: "img",
                           "aria-label": "Histograma da latência de resposta" });
    svg.append(s("line", { class: "axis", x1: SIDE, y1: base, x2: W - SIDE, y2: base }));
    hist.counts.forEach((count, i) => {
      const x = SIDE + i * step;
      const height = ((base - TOP) * count) / max;
      const upper = i + 1 < n ? `${hist.edges_ms[i + 1]}` : "∞";
      const bar = s("rect", { class: "bar", x: x + 2, y: base - height, width: step - 4,
                              height });
      bar.append(s("title", {}, `${hist.edges_ms[i]}–${upper} ms: ${count}`));
      svg.append(bar);
      if (count) svg.append(s("text", { class: "count", x: x + step / 2, y: base - height - 4 },
                              count));
      svg.append(s("line", { class: "axis", x1: x, y1: base, x2: x, y2: base + 4 }));
      svg.append(s("text", { x, y: base + 16 }, hist.edges_ms[i]));
    });
    return svg;
  }

  function renderPeople(people) {
    if (!people.length) return h("p", { class: "empty" }, "Ninguém falou com o clone ainda.");
    let first = true;
    return h("div", {}, people.map((p) => h("div", { class: "person" }, [
      h("div", { class: "who" }, [h("h3", {}, p.name || "Sem nome"),
                                  h("span", { class: "number" }, p.number),
                                  h("span", { class: "caption" },
                                    `última atividade ${when(p.last_activity_at)}`)]),
      p.conversations.map((c) => {
        const open = opened.has(c.id) ? opened.get(c.id) : first;
        first = false;
        return conversation(c, open);
      }),
    ])));
  }

  function conversation(c, open) {
    const live = c.ended_at ? null : h("span", { class: "badge live" }, "em andamento");
    const summary = h("summary", {}, [
      `${CHANNELS[c.channel] || c.channel} · ${when(c.started_at)} · ` +
        `${c.turns.length} ${c.turns.length === 1 ? "fala" : "falas"} `,
      live]);
    const lines = c.turns.map((t) => h("li", { class: t.role }, [
      h("span", { class: "role" }, ROLES[t.role] || t.role),
      t.text,
      t.latency_ms === null ? null : h("span", { class: "meta" }, ms(t.latency_ms)),
    ]));
    const body = lines.length ? h("ol", { class: "transcript" }, lines)
                              : h("p", { class: "empty" }, "Sem falas registradas.");
    const details = h("details", { "data-conversation": c.id, open }, [summary, body]);
    details.addEventListener("toggle", () => opened.set(c.id, details.open));
    return details;
  }

  function draw(id, data, render) {
    const json = JSON.stringify(data);
    if (shown[id] === json) return;  // keeps a selection or an open transcript in place
    shown[id] = json;
    document.querySelector(`#${id} .body`).replaceChildren(render(data));
  }

  function renderAll(snap) {
    draw("health", { ...snap.health, instances: snap.instances }, renderHealth);
    draw("latency", snap.latency, renderLatency);
    draw("limits", snap.limits, renderLimits);
    draw("leads", snap.leads, renderLeads);
    draw("calls", snap.live_calls, renderCalls);
    draw("people", snap.people, renderPeople);
  }

  function stamp(text, error) {
    const node = document.getElementById("stamp");
    node.textContent = text;
    node.classList.toggle("error", Boolean(error));
  }

  async function refresh() {
    if (document.hidden) {  // a background tab costs the gateway nothing
      setTimeout(refresh, REFRESH_MS);
      return;
    }
    try {
      const response = await fetch(DATA_URL, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401 || response.status === 403) {
        stamp("sessão expirada: abra de novo com ?token=…", true);
      } else if (!response.ok) {
        stamp(`erro ${response.status} ao atualizar`, true);
      } else {
        renderAll(await response.json());
        stamp(`atualizado às ${new Date().toLocaleTimeString("pt-BR")}`);
      }
    } catch (err) {
      stamp("sem conexão com o gateway", true);
    }
    setTimeout(refresh, REFRESH_MS);
  }

  // The token has done its work (the cookie is set); keep it out of the address bar.
  if (new URLSearchParams(location.search).has("token")) {
    history.replaceState(null, "", location.pathname);
  }
  renderAll(JSON.parse(document.getElementById("snapshot").textContent));
  stamp("dados do carregamento");
  setTimeout(refresh, REFRESH_MS);
})();
</script>
</body>
</html>
"""
