"""The report page: one Jinja2 template, autoescaped; no script, no external resource."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>clipda report</title>
<style>
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .88em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.ci { color: #777; font-size: .85em; } .sig { font-weight: bold; }
.note { color: #555; font-size: .85em; max-width: 900px; }
.charts svg { margin: 4px; border: 1px solid #eee; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(270px, 1fr));
           gap: 10px; }
.card { border: 1px solid #ddd; padding: 6px; font-size: .82em; }
.card img { display: block; max-width: 100%; margin-bottom: 4px; }
.ok { color: #1a7f37; } .no { color: #b42318; } .ref { color: #555; }
</style></head><body>
<h1>clipda report</h1>
<p class="note">{{ run }}</p>

<h2>CLIP probes</h2>
{% if clip_rows %}
<table><tr><th>style</th><th>images</th><th>test n</th><th>category zero-shot</th>
<th>category linear</th><th>colour zero-shot</th><th>colour linear</th></tr>
{% for r in clip_rows %}<tr><td>{{ r.style }}</td><td>{{ r.kind }}</td><td>{{ r.n }}</td>
<td>{{ "%.3f"|format(r.category_zeroshot) }}</td><td>{{ "%.3f"|format(r.category_linear) }}</td>
<td>{{ "%.3f"|format(r.colour_zeroshot) }}</td><td>{{ "%.3f"|format(r.colour_linear) }}</td></tr>
{% endfor %}</table>
<p class="note">Chance: {{ "%.3f"|format(clip_rows[0].category_chance) }} (category),
{{ "%.3f"|format(clip_rows[0].colour_chance) }} (colour).</p>
{% else %}<p class="note">No probes measured.</p>{% endif %}
{% if scene_rows %}
<p>Whole scenes: a multi-label linear probe of what is present (what a decoder can read).</p>
<table><tr><th>style</th><th>labels</th><th>recall@k [95%]</th><th>chance</th><th>precision</th>
<th>recall</th><th>objects present</th><th>L2 (CV)</th><th>fit n / test n</th></tr>
{% for r in scene_rows %}<tr><td>{{ r.style }}</td><td>{{ r.set }} ({{ r.labels }})</td>
<td>{{ "%.3f"|format(r.recall_at_k) }}{% if r.recall_at_k_ci %} [{{ "%.3f"|format(r.recall_at_k_ci[0]) }}, {{ "%.3f"|format(r.recall_at_k_ci[1]) }}]{% endif %}</td>
<td>{{ "%.3f"|format(r.chance_recall_at_k) }}</td>
<td>{{ "%.3f"|format(r.precision) }}</td><td>{{ "%.3f"|format(r.recall) }}</td>
<td>{{ r.mean_present }}</td><td>{{ r.l2 if r.l2 is defined else "–" }}</td>
<td>{{ r.n_train }} / {{ r.n_test }}</td></tr>
{% endfor %}</table>
<p class="note">recall@k: share of the k labels present found among the k top-scored;
the interval: bootstrap over the test scenes, the fit held fixed; L2: the probe's penalty,
chosen by cross-validation on the fit scenes.</p>
{% endif %}

<h2>VQA: top-1 on the test split</h2>
{% if vqa.groups %}
<table><tr><th>questions</th><th>n</th>{% for m in vqa.methods %}<th>{{ m }}</th>{% endfor %}</tr>
{% for g in vqa.groups %}<tr><td>{{ g.name }}</td><td>{{ g.n }}</td>
{% for c in g.cells %}<td>{{ c.text }} <span class="ci">{{ c.ci }}</span></td>{% endfor %}</tr>
{% endfor %}</table>
<table><tr><th>paired difference</th>{% for d in vqa.diff_names %}<th>{{ d }}</th>{% endfor %}</tr>
{% for g in vqa.diffs %}<tr><td>{{ g.name }}</td>
{% for c in g.cells %}<td class="{{ 'sig' if c.excludes_zero }}">{{ c.text }}
<span class="ci">{{ c.ci }}</span></td>{% endfor %}</tr>{% endfor %}</table>
<p class="note">{{ vqa.method }}. Bold: the interval excludes 0.</p>
{% else %}<p class="note">No VQA evaluation found.</p>{% endif %}

<h2>Captioning</h2>
{% if caption.systems %}
<table><tr><th>system</th>{% for m in caption.metrics %}<th>{{ m }}</th>{% endfor %}
{% for h in caption.form_heads %}<th>{{ h }}</th>{% endfor %}</tr>
{% for s in caption.systems %}<tr><td>{{ s.name }}</td>
{% for c in s.cells %}<td>{{ c.text }} <span class="ci">{{ c.ci }}</span></td>{% endfor %}
{% for f in s.form %}<td>{{ f }}</td>{% endfor %}</tr>{% endfor %}
{% if caption.references %}<tr><td>references</td>{% for c in caption.references.cells %}
<td>{{ c.text }} <span class="ci">{{ c.ci }}</span></td>{% endfor %}
{% for f in caption.references.form %}<td>{{ f }}</td>{% endfor %}</tr>{% endif %}</table>
<table><tr><th>paired difference</th>{% for m in caption.metrics %}<th>{{ m }}</th>{% endfor %}</tr>
{% for s in caption.diffs %}<tr><td>{{ s.name }}</td>
{% for c in s.cells %}<td class="{{ 'sig' if c.excludes_zero }}">{{ c.text }}
<span class="ci">{{ c.ci }}</span></td>{% endfor %}</tr>{% endfor %}</table>
<p class="note">{{ caption.method }}. Bold: the interval excludes 0.</p>
{% if caption.clipscore %}<p class="note">CLIPScore: 2.5 &times; max(cos, 0) of the CLIP
embeddings of "A photo depicts" + caption and of the image; RefCLIPScore: its harmonic mean
with the best cosine with a reference (Hessel et al. 2021). References: each against its
image, RefCLIPScore against the image's other references (leave one out). Its scale is the
CLIP's own: compare systems with the references' score, not with published values.</p>{% endif %}
{% if caption.gap %}<table><tr><th>LAION vs Flickr30k</th><th>proxy A-distance</th>
<th>domain classifier error</th><th>centroid gap</th><th>test rows</th></tr>
{% for g in caption.gap %}<tr><td>{{ g.what }}</td><td>{{ g.d }} <span class="ci">{{ g.ci }}</span>
</td><td>{{ g.error }}</td><td>{{ g.centroid }}</td><td>{{ g.n }}</td></tr>{% endfor %}</table>
<p class="note">Domain gap: d_A = 2(1 - 2&epsilon;), &epsilon; the held-out error of a linear
classifier telling the two datasets' rows apart (balanced); 2: separable, 0: indistinguishable.
It saturates at 2 for any shift a line separates, however small; the centroid gap is the
distance between the two domains' mean rows in units of the source rows' mean distance to
theirs (0: same centre).</p>{% endif %}
{% if caption.form_heads %}<p class="note">Form: well-formed = parses under the sample
world's caption grammar; repeats a 4-gram = some 4 words occur twice, with the repetition
rule on (the captions scored) and off (the model's own looping); count right = of the
captions stating "N shapes", the share whose N is the scene's (of how many).</p>{% endif %}
{% else %}<p class="note">No caption evaluation found.</p>{% endif %}

{% if sweeps %}<h2>Adaptation sweeps (DVC experiments, mean ± std over seeds)</h2>
<p class="note">From metrics/seeds/adaptation_*.json (<code>clipda seeds --intervals</code>):
one table and plot per world. Under a paired difference: of its seeds, how many have their
own 95% interval wholly above / below 0 (green: at least 2 above).</p>
{% for w in sweeps %}<h3>{{ w.name }}</h3>{% if w.note %}<p class="note">{{ w.note }}</p>{% endif %}
<table><tr><th>setting</th><th>seeds</th>{% for m in w.metrics %}<th>{{ m }}</th>{% endfor %}</tr>
{% for r in w.rows %}<tr><td>{{ r.setting }}</td><td>{{ r.seeds }}</td>
{% for c in r.cells %}<td class="{{ 'sig' if c.excludes_zero }}">{{ c.text }}
<span class="ci">{{ c.ci }}</span></td>{% endfor %}</tr>{% endfor %}</table>
<div class="charts">{{ w.svg|safe }}</div>{% endfor %}{% endif %}

<h2>Training curves</h2>
<div class="charts">{% for svg in charts %}{{ svg|safe }}{% endfor %}</div>

<h2>Captions of test images</h2>
<div class="gallery">{% for it in caption_gallery %}<div class="card">
{% if it.src %}<img src="{{ it.src }}" alt="test image {{ it.image_id }}">
{% else %}<p class="note">image {{ it.image_id }} not found</p>{% endif %}
{% for name, text in it.captions %}<div><b>{{ name }}</b>: {{ text }}</div>{% endfor %}
{% for r in it.references %}<div class="ref">ref: {{ r }}</div>{% endfor %}
</div>{% endfor %}</div>

<h2>VQA test questions</h2>
<p class="note">Boxes: red, the subject (or the object asked about); blue, the object.</p>
<div class="gallery">{% for it in vqa_gallery %}<div class="card">
{% if it.src %}<img src="{{ it.src }}" alt="{{ it.question }}">
{% else %}<p class="note">image not found</p>{% endif %}
<div><b>{{ it.question }}</b></div><div>truth: <b>{{ it.answer }}</b></div>
{% for name, a, ok in it.answers %}<div class="{{ 'ok' if ok else 'no' }}">
{{ '✔' if ok else '✘' }} {{ name }}: {{ a }}</div>{% endfor %}
</div>{% endfor %}</div>
</body></html>
"""
