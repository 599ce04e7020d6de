"""The page's inline style and script (no network, no framework).

CSS: one column up to 1100 px, charts in a grid of >= 300 px cells (one per row on a phone),
wide tables scroll inside their box. Script (ES5, no dependencies): the sample-grid slider, and
the live reload of a served page (poll ``version``; reload when it differs from the page's
``data-version``; stop once the server says no run is live).
"""

CSS = """
:root{--fg:#1d2329;--muted:#5d6670;--line:#dde1e5;--bg:#fff;--card:#f7f8fa;--accent:#0072b2}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header,main{max-width:1100px;margin:0 auto;padding:0 14px}
header{padding-top:14px}
h1{font-size:1.45em;margin:.2em 0;word-break:break-all}
h2{font-size:1.2em;margin:1.4em 0 .5em;padding-bottom:.2em;border-bottom:1px solid var(--line)}
h3{font-size:1.02em;margin:1em 0 .3em}
.headline{font-size:1.08em;margin:.2em 0}
.meta,.note,.file{color:var(--muted);font-size:.88em;margin:.3em 0}
.missing{color:var(--muted);font-style:italic;background:var(--card);padding:10px 12px;border-radius:6px}
.warn{background:#fff4e0;border-left:4px solid #e69f00;padding:6px 10px;margin:.5em 0}
nav{display:flex;flex-wrap:wrap;gap:4px 14px;margin:.5em 0 0;font-size:.92em}
nav a{color:var(--accent);text-decoration:none}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch;margin:.4em 0}
table{border-collapse:collapse;font-size:.9em;min-width:50%}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
td{font-variant-numeric:tabular-nums}
th{background:var(--card);font-weight:600}
table.kv td:first-child{color:var(--muted);white-space:nowrap}
table.kv td:last-child{overflow-wrap:anywhere}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:.85em;color:#fff;background:#777}
.badge.running{background:#009e73}.badge.finished{background:#0072b2}.badge.stopped{background:#d55e00}
progress{width:160px;vertical-align:middle}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:12px;margin:.6em 0}
figure{margin:0}
.chart{background:var(--card);border-radius:6px;padding:8px}
.chart figcaption{font-weight:600;font-size:.9em;margin-bottom:4px}
.chart svg{width:100%;height:auto;display:block;background:#fff}
.legend{display:flex;flex-wrap:wrap;gap:2px 12px;font-size:.8em;margin-top:4px}
.legend i{display:inline-block;width:14px;height:3px;margin-right:5px;vertical-align:middle}
.grids .frames figure{text-align:center}
.grids img{image-rendering:pixelated;max-width:100%;width:512px;height:auto;border:1px solid var(--line)}
.grids figure[hidden]{display:none}
.grids figcaption{color:var(--muted);font-size:.88em}
.slider{display:flex;align-items:center;gap:8px;margin:.4em 0;font-size:.9em}
.slider input{flex:1;max-width:520px}
.side{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:12px}
details{margin:.5em 0}
summary{cursor:pointer;font-weight:600}
article.result{margin:0 0 1.2em}
ul.plan{padding-left:1.2em;margin:.3em 0}
code{font-size:.92em}
@media (max-width:600px){body{font-size:14px}th,td{padding:3px 6px}.charts{grid-template-columns:1fr}}
"""

SCRIPT = """
(function(){
  var boxes = document.querySelectorAll('.grids');
  for (var b = 0; b < boxes.length; b++) {
    (function(box){
      var figs = box.querySelectorAll('.frames figure'), range = box.querySelector('input[type=range]');
      var out = box.querySelector('output');
      if (!range || !figs.length) return;
      function show(i){
        for (var k = 0; k < figs.length; k++) figs[k].hidden = (k !== i);
        if (out) out.textContent = figs[i].getAttribute('data-label');
      }
      range.addEventListener('input', function(){ show(+range.value); });
      show(+range.value);
    })(boxes[b]);
  }
  var body = document.body, every = 1000 * (+body.getAttribute('data-poll') || 0);
  if (body.getAttribute('data-live') !== '1' || !every || location.protocol.indexOf('http') !== 0) return;
  var mine = body.getAttribute('data-version');
  function poll(){
    fetch('version', {cache: 'no-store'}).then(function(r){ return r.json(); }).then(function(v){
      if (v.version !== mine) { location.reload(); return; }
      if (v.live) setTimeout(poll, every);
    }).catch(function(){ setTimeout(poll, 4 * every); });
  }
  setTimeout(poll, every);
})();
"""
