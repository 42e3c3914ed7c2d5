// A small, dependency-free SVG scatter plot: points with symmetric y error
// bars, several series with a legend, an optional y = x reference line, axis
// ticks and titles, linear or symmetric-log axes. Enough for a calibration
// plot (predicted against measured) that opens in any browser; not a
// plotting library.
//
// Non-finite points are left out (and counted on the plot), so every
// coordinate written is finite. A degenerate range (one point, or all values
// equal) is widened around its value.
#pragma once

#include "entropy_probe/core/error.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace entropy_probe {

struct PlotPoint {
  double x = 0, y = 0;
  double y_err = 0;  // half-length of the error bar; 0 draws none
};

// A diamond tells a second estimate of the same quantity apart from a
// circle series while both stay readable in grey scale.
enum class Marker { circle, diamond };

struct PlotSeries {
  std::string label;
  std::string color;  // any SVG colour; empty picks from a colour-blind-safe palette
  std::vector<PlotPoint> points;
  Marker marker = Marker::circle;
  // Horizontal shift in pixels when drawn (the data are unchanged), so two
  // estimates at the same x sit side by side instead of hiding each other.
  double dodge_px = 0;
};

// symlog maps v to sign(v) log10(1 + |v| / c): linear near zero, logarithmic
// beyond c, so values spanning decades, of either sign, stay readable.
enum class AxisScale { linear, symlog };

struct ScatterPlot {
  std::string title, x_label, y_label;
  std::vector<PlotSeries> series;
  bool identity_line = true;            // draw y = x
  bool equal_ranges = true;             // one range for both axes, so y = x is the diagonal
  AxisScale scale = AxisScale::linear;  // both axes (the same map keeps y = x straight)
  double symlog_c = 0;                  // symlog's linear width c; 0 picks half the smallest |value|
  int width = 720, height = 560;
};

namespace svg_detail {

inline std::string escape(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
inline const char* palette(std::size_t i) {
  static const char* const colors[] = {"#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"};
  return colors[i % (sizeof(colors) / sizeof(colors[0]))];
}

inline std::string num(double v) { return fmt::format("{:.2f}", v); }

struct Range {
  double lo = 0, hi = 0;
  bool empty = true;
  void add(double v) {
    if (!std::isfinite(v)) return;
    lo = empty ? v : std::min(lo, v);
    hi = empty ? v : std::max(hi, v);
    empty = false;
  }
  void add(const Range& r) {
    if (!r.empty) add(r.lo), add(r.hi);
  }
};

// Widens a degenerate or empty range and adds a margin so no point sits on the frame.
inline Range padded(Range r) {
  if (r.empty) return Range{0, 1, false};
  const double span = r.hi - r.lo;
  const double mag = std::max(std::abs(r.lo), std::abs(r.hi));
  if (!(span > 1e-12 * mag) || span == 0) {
    const double half = mag > 0 ? 0.1 * mag : 1.0;
    return Range{r.lo - half, r.hi + half, false};
  }
  return Range{r.lo - 0.06 * span, r.hi + 0.06 * span, false};
}

// "Nice" tick step (1, 2 or 5 times a power of ten) giving about `target` ticks.
inline double tick_step(double span, int target) {
  const double raw = span / std::max(target, 1);
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  const double f = raw / p;
  return (f < 1.5 ? 1.0 : f < 3.5 ? 2.0 : f < 7.5 ? 5.0 : 10.0) * p;
}

// Tick labels with as few digits as the step needs, the same format along an axis.
inline std::string linear_label(double v, double step) {
  if (v == 0) return "0";
  const double a = std::max(std::abs(v), step);
  if (a >= 1e5 || a < 1e-3) {
    const int digits = std::max(0, static_cast<int>(std::ceil(std::log10(a / step) - 1e-9)));
    return fmt::format("{:.{}e}", v, std::min(digits, 6));
  }
  const int decimals = std::max(0, static_cast<int>(std::ceil(-std::log10(step) - 1e-9)));
  return fmt::format("{:.{}f}", v, std::min(decimals, 10));
}

inline std::string symlog_label(double v) {
  if (v == 0) return "0";
  const double a = std::abs(v);
  return a >= 1e-3 && a < 1e4 ? fmt::format("{:g}", v) : fmt::format("{:.0e}", v);
}

struct Tick {
  double v;
  std::string label;
};

// One axis: the map from data to plot units u and back, its range in u, its ticks.
struct Axis {
  bool symlog = false;
  double c = 1;
  Range u;  // padded, in plot units

  double to_u(double v) const { return symlog ? std::copysign(std::log10(1 + std::abs(v) / c), v) : v; }

  std::vector<Tick> ticks() const {
    std::vector<Tick> out;
    if (!symlog) {
      const double step = tick_step(u.hi - u.lo, 6);
      if (!(step > 0) || !std::isfinite(step)) return out;
      const double k0 = std::ceil(u.lo / step - 1e-9), k1 = std::floor(u.hi / step + 1e-9);
      for (double k = k0; k <= k1 && out.size() < 50; k += 1) {
        const double v = std::abs(k) < 0.5 ? 0.0 : k * step;  // an exact 0, not -1e-19
        out.push_back({v, linear_label(v, step)});
      }
      return out;
    }
    // Decades (and 2x, 5x when the range holds few decades) of both signs, and 0.
    auto inside = [&](double v) { return to_u(v) >= u.lo - 1e-12 && to_u(v) <= u.hi + 1e-12; };
    const int k_lo = static_cast<int>(std::floor(std::log10(c))) - 1;
    const int k_hi = static_cast<int>(std::ceil(std::log10(c) + std::max(std::abs(u.lo), std::abs(u.hi)))) + 1;
    for (const std::vector<double>& mantissas : {std::vector<double>{1}, std::vector<double>{1, 2, 5}}) {
      std::vector<double> vs;
      if (inside(0)) vs.push_back(0);
      for (int k = k_lo; k <= k_hi; ++k)
        for (double m : mantissas) {
          const double v = m * std::pow(10.0, k);
          if (v < 0.99 * c) continue;  // inside the linear zone ticks would crowd
          for (double sv : {v, -v})
            if (inside(sv)) vs.push_back(sv);
        }
      std::sort(vs.begin(), vs.end());
      if (vs.size() >= 4 || mantissas.size() > 1) {
        // Thin to about a dozen labels: every other decade when there are many.
        std::size_t stride = 1;
        while (vs.size() / stride > 12) ++stride;
        for (std::size_t i = 0; i < vs.size(); ++i)
          if (vs[i] == 0 || i % stride == 0) out.push_back({vs[i], symlog_label(vs[i])});
        break;
      }
    }
    return out;
  }
};

}  // namespace svg_detail

// The plot as an SVG document.
inline std::string render_svg(const ScatterPlot& plot) {
  using namespace svg_detail;
  const double W = std::max(plot.width, 200), H = std::max(plot.height, 160);
  // Plot area: room on the left for tick labels and the y title, below for x.
  const double left = 92, right = W - 24, top = plot.title.empty() ? 24 : 54, bottom = H - 62;
  auto finite = [](const PlotPoint& p) { return std::isfinite(p.x) && std::isfinite(p.y); };
  auto err = [](const PlotPoint& p) { return std::isfinite(p.y_err) ? std::abs(p.y_err) : 0.0; };

  Axis ax, ay;
  ax.symlog = ay.symlog = plot.scale == AxisScale::symlog;
  if (ax.symlog) {
    double c = plot.symlog_c;
    if (!(c > 0) || !std::isfinite(c)) {
      double smallest = 0;
      for (const auto& s : plot.series)
        for (const auto& p : s.points)
          if (finite(p))
            for (double v : {p.x, p.y})
              if (v != 0 && (smallest == 0 || std::abs(v) < smallest)) smallest = std::abs(v);
      c = smallest > 0 ? smallest / 2 : 1.0;
    }
    ax.c = ay.c = c;
  }
  std::size_t dropped = 0;
  for (const auto& s : plot.series)
    for (const auto& p : s.points) {
      if (!finite(p)) {
        ++dropped;
        continue;
      }
      ax.u.add(ax.to_u(p.x));
      ay.u.add(ay.to_u(p.y - err(p)));
      ay.u.add(ay.to_u(p.y + err(p)));
    }
  if (plot.equal_ranges) {
    Range both = ax.u;
    both.add(ay.u);
    ax.u = ay.u = both;
  }
  ax.u = padded(ax.u);
  ay.u = padded(ay.u);
  auto sx = [&](double x) { return left + (ax.to_u(x) - ax.u.lo) / (ax.u.hi - ax.u.lo) * (right - left); };
  auto sy = [&](double y) { return bottom - (ay.to_u(y) - ay.u.lo) / (ay.u.hi - ay.u.lo) * (bottom - top); };

  std::string o;
  o += fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">\n",
      num(W), num(H));
  o += fmt::format("<rect x=\"0\" y=\"0\" width=\"{}\" height=\"{}\" fill=\"white\"/>\n", num(W), num(H));
  const double mid = (left + right) / 2;
  if (!plot.title.empty())  // centred on the page: a long title has the most room there
    o += fmt::format("<text x=\"{}\" y=\"28\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">{}</text>\n",
                     num(W / 2), escape(plot.title));
  std::string note;
  if (ax.symlog) note = fmt::format("symmetric log axes, linear for |value| below {:.2g}", ax.c);
  if (dropped > 0)
    note +=
        fmt::format("{}{} non-finite point{} not shown", note.empty() ? "" : "; ", dropped, dropped == 1 ? "" : "s");
  if (!note.empty())
    o += fmt::format("<text x=\"{}\" y=\"45\" text-anchor=\"middle\" fill=\"{}\">{}</text>\n", num(W / 2),
                     dropped > 0 ? "#b00" : "#555", escape(note));

  // Grid, the zero lines (they help read signs), the frame, ticks and labels.
  const std::vector<Tick> xt = ax.ticks(), yt = ay.ticks();
  o += "<g stroke=\"#e4e4e4\" stroke-width=\"1\">\n";
  for (const Tick& t : xt)
    o += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\"/>\n", num(sx(t.v)), num(top), num(bottom));
  for (const Tick& t : yt)
    o += fmt::format("<line x1=\"{1}\" y1=\"{0}\" x2=\"{2}\" y2=\"{0}\"/>\n", num(sy(t.v)), num(left), num(right));
  o += "</g>\n";
  if (ax.u.lo < 0 && ax.u.hi > 0)
    o += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"#aaa\"/>\n", num(sx(0)), num(top),
                     num(bottom));
  if (ay.u.lo < 0 && ay.u.hi > 0)
    o += fmt::format("<line x1=\"{1}\" y1=\"{0}\" x2=\"{2}\" y2=\"{0}\" stroke=\"#aaa\"/>\n", num(sy(0)), num(left),
                     num(right));
  o += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>\n", num(left),
                   num(top), num(right - left), num(bottom - top));
  o += "<g fill=\"#333\">\n";
  for (const Tick& t : xt) {
    o += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"#333\"/>\n", num(sx(t.v)), num(bottom),
                     num(bottom + 5));
    o += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", num(sx(t.v)), num(bottom + 19),
                     escape(t.label));
  }
  for (const Tick& t : yt) {
    o += fmt::format("<line x1=\"{1}\" y1=\"{0}\" x2=\"{2}\" y2=\"{0}\" stroke=\"#333\"/>\n", num(sy(t.v)),
                     num(left - 5), num(left));
    o += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n", num(left - 8), num(sy(t.v) + 4),
                     escape(t.label));
  }
  o += "</g>\n";
  if (!plot.x_label.empty())
    o += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"13\">{}</text>\n", num(mid),
                     num(H - 18), escape(plot.x_label));
  if (!plot.y_label.empty())
    o += fmt::format(
        "<text x=\"0\" y=\"0\" text-anchor=\"middle\" font-size=\"13\" "
        "transform=\"translate(20 {}) rotate(-90)\">{}</text>\n",
        num((top + bottom) / 2), escape(plot.y_label));

  // Everything inside the frame is clipped to it (the y = x line, long error bars).
  o += fmt::format("<clipPath id=\"plot-area\"><rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\"/></clipPath>\n",
                   num(left), num(top), num(right - left), num(bottom - top));
  o += "<g clip-path=\"url(#plot-area)\">\n";
  if (plot.identity_line) {
    // Both axes share the map, so y = x is straight: from the larger lower end to the smaller upper end.
    const double lo = std::max(ax.u.lo, ay.u.lo), hi = std::min(ax.u.hi, ay.u.hi);
    auto px = [&](double u) { return left + (u - ax.u.lo) / (ax.u.hi - ax.u.lo) * (right - left); };
    auto py = [&](double u) { return bottom - (u - ay.u.lo) / (ay.u.hi - ay.u.lo) * (bottom - top); };
    if (lo < hi && ax.symlog == ay.symlog && ax.c == ay.c)
      o += fmt::format(
          "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#666\" stroke-width=\"1.2\" "
          "stroke-dasharray=\"6 4\"/>\n",
          num(px(lo)), num(py(lo)), num(px(hi)), num(py(hi)));
  }
  for (std::size_t si = 0; si < plot.series.size(); ++si) {
    const PlotSeries& s = plot.series[si];
    const std::string color = escape(s.color.empty() ? palette(si) : s.color);
    o += fmt::format("<g stroke=\"{0}\" fill=\"{0}\">\n", color);
    for (const auto& p : s.points) {
      if (!finite(p)) continue;
      const double e = err(p), cx = sx(p.x) + (std::isfinite(s.dodge_px) ? s.dodge_px : 0.0), cy = sy(p.y);
      if (e > 0) {
        const double y0 = sy(p.y - e), y1 = sy(p.y + e);
        o += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke-width=\"1.5\"/>\n", num(cx), num(y0),
                         num(y1));
        for (double yy : {y0, y1})
          o += fmt::format("<line x1=\"{0}\" y1=\"{2}\" x2=\"{1}\" y2=\"{2}\" stroke-width=\"1.5\"/>\n", num(cx - 4),
                           num(cx + 4), num(yy));
      }
      if (s.marker == Marker::diamond)
        o += fmt::format(
            "<path d=\"M{0} {1}L{2} {3}L{0} {4}L{5} {3}Z\" fill-opacity=\"0.85\" stroke=\"white\" "
            "stroke-width=\"0.8\"/>\n",
            num(cx), num(cy - 5), num(cx + 5), num(cy), num(cy + 5), num(cx - 5));
      else
        o += fmt::format(
            "<circle cx=\"{}\" cy=\"{}\" r=\"4\" fill-opacity=\"0.85\" stroke=\"white\" stroke-width=\"0.8\"/>\n",
            num(cx), num(cy));
    }
    o += "</g>\n";
  }
  o += "</g>\n";

  // Legend inside the frame, in the corner that covers the fewest points
  // (top left on ties); a white box keeps it readable.
  std::vector<std::pair<std::string, std::string>> entries;  // (label, colour); empty colour = the y = x line
  for (std::size_t si = 0; si < plot.series.size(); ++si)
    entries.emplace_back(plot.series[si].label, plot.series[si].color.empty() ? palette(si) : plot.series[si].color);
  if (plot.identity_line) entries.emplace_back("y = x", "");
  if (!entries.empty()) {
    std::size_t longest = 0;
    for (const auto& e : entries) longest = std::max(longest, e.first.size());
    const double lw = 40 + 6.6 * static_cast<double>(longest), lh = 8 + 18 * static_cast<double>(entries.size());
    double lx = left + 10, ly = top + 10;
    std::size_t best = static_cast<std::size_t>(-1);
    for (int corner = 0; corner < 4; ++corner) {
      const double cx = corner % 2 == 0 ? left + 10 : right - 10 - lw, cy = corner < 2 ? top + 10 : bottom - 10 - lh;
      std::size_t covered = 0;
      for (const auto& s : plot.series)
        for (const auto& p : s.points)
          if (finite(p) && sx(p.x) >= cx - 6 && sx(p.x) <= cx + lw + 6 && sy(p.y) >= cy - 6 && sy(p.y) <= cy + lh + 6)
            ++covered;
      if (covered < best) best = covered, lx = cx, ly = cy;
    }
    o += fmt::format(
        "<g><rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"white\" fill-opacity=\"0.9\" stroke=\"#bbb\"/>\n",
        num(lx), num(ly), num(lw), num(lh));
    for (std::size_t i = 0; i < entries.size(); ++i) {
      const double cy = ly + 13 + 18 * static_cast<double>(i);
      if (entries[i].second.empty())
        o += fmt::format(
            "<line x1=\"{0}\" y1=\"{2}\" x2=\"{1}\" y2=\"{2}\" stroke=\"#666\" stroke-dasharray=\"6 4\"/>\n",
            num(lx + 6), num(lx + 24), num(cy));
      else
        o += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"9\" height=\"9\" fill=\"{}\"/>\n", num(lx + 10),
                         num(cy - 4.5), escape(entries[i].second));
      o += fmt::format("<text x=\"{}\" y=\"{}\">{}</text>\n", num(lx + 30), num(cy + 4), escape(entries[i].first));
    }
    o += "</g>\n";
  }
  o += "</svg>\n";
  return o;
}

// Writes render_svg(plot) to `path`; an InputError names the path on failure.
inline void write_svg(const std::string& path, const ScatterPlot& plot) {
  const std::string doc = render_svg(plot);
  std::ofstream out(path, std::ios::binary);
  if (!out) fail<InputError>("cannot open '{}' for writing the SVG plot", path);
  out << doc;
  out.close();
  if (!out) fail<InputError>("writing the SVG plot to '{}' failed", path);
}

}  // namespace entropy_probe
