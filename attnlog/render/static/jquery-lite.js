// The few jQuery calls bertviz 1.4.1's views make, for the event page (jQuery slim is 70 kB):
// $("#root #id") or $("<option />"), then append, attr, val, text, empty, on and change.
function attnlogJQuery(selector) {
  "use strict";
  var els = selector.charAt(0) === "<"
    ? [document.createElement(selector.replace(/[<>\/\s]/g, ""))]
    : Array.prototype.slice.call(document.querySelectorAll(selector));
  var q = {els: els};
  function each(fn) { els.forEach(fn); return q; }
  q.append = function (other) {
    return each(function (e) { other.els.forEach(function (c) { e.appendChild(c); }); });
  };
  q.val = function (value) {
    if (value === undefined) return els.length ? els[0].value : undefined;
    return each(function (e) { e.value = String(value); });
  };
  q.attr = function (name, value) {
    return each(function (e) { e.setAttribute(name, String(value)); });
  };
  q.text = function (text) { return each(function (e) { e.textContent = String(text); }); };
  q.empty = function () { return each(function (e) { e.textContent = ""; }); };
  q.on = function (type, fn) { return each(function (e) { e.addEventListener(type, fn); }); };
  q.change = function () {
    return each(function (e) { e.dispatchEvent(new Event("change")); });
  };
  return q;
}
