#!/usr/bin/env python3
"""Writes the hand-made seeds of every target under fuzz/seeds/ (run from fuzz/).

The YAML definitions are the source: greeting.yaml (tests/it/flow), order_saga.yaml
(examples/flows) and mixed.yaml (TCC, SQL, NATS, headers, retry policy); their
JSON and TOML forms are generated here and checked to load to the same data.
"""
import json, re, tomllib
import yaml

def w(d, name, data):
    open(f'seeds/{d}/{name}', 'wb').write(data.encode())

def key(k): return k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else json.dumps(k)

def val(v):
    if isinstance(v, bool): return 'true' if v else 'false'
    if isinstance(v, (int, float)): return repr(v)
    if isinstance(v, str): return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list): return '[' + ', '.join(val(x) for x in v if x is not None) + ']'
    if isinstance(v, dict): return '{ ' + ', '.join(f'{key(k)} = {val(x)}' for k, x in v.items() if x is not None) + ' }'
    raise TypeError(v)

def strip(x):  # TOML has no null
    if isinstance(x, dict): return {k: strip(v) for k, v in x.items() if v is not None}
    if isinstance(x, list): return [strip(v) for v in x if v is not None]
    return x

for name in ['greeting', 'order_saga', 'mixed']:
    doc = yaml.safe_load(open(f'seeds/definition_yaml/{name}.yaml'))
    json.dump(doc, open(f'seeds/definition_json/{name}.json', 'w'), indent=2)
    head, tables = [], []
    for k, v in doc.items():
        if k == 'tasks':
            continue
        if isinstance(v, dict):
            tables.append(f'\n[{k}]')
            tables += [f'{key(a)} = {val(b)}' for a, b in v.items()]
        else:
            head.append(f'{key(k)} = {val(v)}')
    for t in doc['tasks']:
        tables.append('\n[[tasks]]')
        tables += [f'{key(a)} = {val(b)}' for a, b in t.items()]
    text = '\n'.join(head + tables) + '\n'
    assert tomllib.loads(text) == strip(doc), name
    open(f'seeds/definition_toml/{name}.toml', 'w').write(text)

fi = json.dumps({"name": "Ada", "amount": 42, "customer": {"id": "c1"}, "items": [1, "two", {"x": [True, None]}]})
outs = json.dumps({"greet": {"text": "hi", "ids": ["r1", "r2"]}, "reserve_stock": {"reservation": "res-9"}})
inp = json.dumps({"amount": 42, "sku": "A-1"})
w('template', 'embedded', "Hello, {{flow.input.name}}!")
w('template', 'whole', "{{ flow.input.amount }}")
w('template', 'index', "{{tasks.greet.output.ids.1}}")
w('template', 'builtins', "{{instance}}/{{idempotency_key}}/{{business_key}}")
w('template', 'unknown', "x {{nope.at.all}} y {{ unclosed")
w('template', 'value_json', json.dumps({"amount": "{{flow.input.amount}}", "who": "customer {{ flow.input.customer.id }} of {{business_key}}", "first": "{{tasks.greet.output.ids.0}}", "list": ["{{input.sku}}", 3, None], "static": 3}))
w('template', 'with_context', "{{input.amount}} of {{input.sku}} for {{flow.input.customer}}\0" + fi + "\0" + outs + "\0" + inp)
w('template', 'nested_braces', "{{{{flow.input.name}}}} }}{{")
w('template_url', 'path_query', "https://x.example/users/{{flow.input.id}}/orders?q={{flow.input.n}}&b={{business_key}}#{{flow.input.uni}}")
w('template_url', 'base', "{{flow.input.service}}/stock/{{flow.input.dots}}x")
w('template_url', 'host', "https://{{flow.input.host}}/x/{{tasks.t.output.id}}")
w('template_url', 'dots', "https://x.example/a/.{{flow.input.dot}}/%2{{flow.input.empty}}e/b")
w('template_url', 'backslash', "http://h.example\\p\\{{flow.input.slash}}?{{flow.input.pct}}")
w('template_url', 'own_input', "https://api.example/v1/{{flow.input.id}}\0" + json.dumps({"id": "../../etc/passwd", "e": ""}))
for name, c in [("full", "12@100:105:101,103"), ("no_xip", "7@50:50:"), ("bare", "42"), ("empty", ""),
                ("snap_only", "@3:9:4,5,8"),
                ("big", "9223372036854775807@18446744073709551614:18446744073709551615:18446744073709551614"),
                ("unsorted", "5@10:20:15,11,15"), ("bad", "-1@9:2:x")]:
    w('cursor', name, c)
w('query_json', 'all', json.dumps({"items": [{"types": [], "tags": []}]}))
w('query_json', 'none', json.dumps({"items": []}))
w('query_json', 'items', json.dumps({"items": [{"types": ["StudentEnrolled"], "tags": ["course:c1"]}, {"tags": ["student:s7"]}, {"types": ["A", "B"]}]}))
w('query_json', 'condition', json.dumps({"fail_if_events_match": {"items": [{"types": ["AccountOpened"], "tags": ["account:42"]}]}, "after": "12@100:105:101,103"}))
w('query_json', 'condition_none', json.dumps({"fail_if_events_match": {"items": []}, "after": None}))
w('query_json', 'unicode', json.dumps({"items": [{"types": ["Ünïcødé\u0000"], "tags": ["k:\ud83d\ude00"]}]}))
