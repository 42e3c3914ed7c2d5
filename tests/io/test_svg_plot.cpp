#include <entropy_probe/io/svg_plot.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

using namespace entropy_probe;

namespace {

std::size_t count(const std::string& s, const std::string& what) {
  std::size_t n = 0;
  for (std::size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
  return n;
}

// A minimal XML well-formedness check, enough for what render_svg writes:
// tags balance, attributes are quoted, every '&' starts a known entity, no
// raw '<' or '>' in text. Returns an empty string when fine, else the problem.
std::string xml_problem(const std::string& s) {
  std::vector<std::string> stack;
  std::size_t i = 0;
  auto entity_ok = [](const std::string& text, std::size_t at) {
    for (const char* e : {"&amp;", "&lt;", "&gt;", "&quot;", "&apos;"})
      if (text.compare(at, std::char_traits<char>::length(e), e) == 0) return true;
    return false;
  };
  while (i < s.size()) {
    if (s[i] == '<') {
      const std::size_t end = s.find('>', i);
      if (end == std::string::npos) return "unterminated tag at " + std::to_string(i);
      std::string tag = s.substr(i + 1, end - i - 1);
      i = end + 1;
      if (tag.empty()) return "empty tag";
      if (tag[0] == '/') {
        if (stack.empty() || stack.back() != tag.substr(1)) return "mismatched </" + tag.substr(1) + ">";
        stack.pop_back();
        continue;
      }
      const bool self_closing = tag.back() == '/';
      if (self_closing) tag.pop_back();
      const std::string name = tag.substr(0, tag.find_first_of(" \n\t"));
      // Attributes: name="value" pairs, values free of '<' and raw '&'.
      static const std::regex attr(R"re(\s+([A-Za-z_:][-A-Za-z0-9_:.]*)="([^"<]*)")re");
      std::string rest = tag.substr(name.size());
      std::smatch m;
      while (std::regex_search(rest, m, attr) && m.position(0) == 0) {
        const std::string value = m[2];
        for (std::size_t k = value.find('&'); k != std::string::npos; k = value.find('&', k + 1))
          if (!entity_ok(value, k)) return "raw '&' in an attribute of <" + name + ">";
        rest = m.suffix();
      }
      if (rest.find_first_not_of(" \n\t") != std::string::npos)
        return "bad attributes in <" + name + ">: '" + rest + "'";
      if (!self_closing) stack.push_back(name);
    } else {
      if (s[i] == '>') return "raw '>' in text at " + std::to_string(i);
      if (s[i] == '&' && !entity_ok(s, i)) return "raw '&' in text at " + std::to_string(i);
      ++i;
    }
  }
  if (!stack.empty()) return "unclosed <" + stack.back() + ">";
  return "";
}

// Every numeric attribute (coordinates, sizes) parses as a finite number.
void require_finite_coordinates(const std::string& s) {
  static const std::regex coord(R"re(\s(x|y|x1|y1|x2|y2|cx|cy|r|width|height)="([^"]*)")re");
  std::size_t n = 0;
  for (auto it = std::sregex_iterator(s.begin(), s.end(), coord); it != std::sregex_iterator(); ++it) {
    const std::string v = (*it)[2];
    char* end = nullptr;
    const double d = std::strtod(v.c_str(), &end);
    INFO((*it)[1] << "=\"" << v << "\"");
    REQUIRE(end == v.c_str() + v.size());
    REQUIRE(std::isfinite(d));
    ++n;
  }
  REQUIRE(n > 10);
  CHECK(s.find("nan") == std::string::npos);
  CHECK(s.find("inf") == std::string::npos);
}

std::string trimmed(const std::string& s) {
  const auto b = s.find_first_not_of(" \n\t"), e = s.find_last_not_of(" \n\t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

ScatterPlot two_series() {
  ScatterPlot p;
  p.title = "calibration";
  p.x_label = "measured";
  p.y_label = "predicted";
  p.series.push_back({"adam", "", {{-0.02, -0.018, 0.004}, {-0.002, -0.0021, 0.0004}, {-0.0002, -0.00019, 0.00004}}});
  p.series.push_back({"precond_sgd", "#123456", {{-0.019, -0.018, 0.004}, {-0.0019, -0.0021, 0.0004}}});
  return p;
}

}  // namespace

TEST_CASE("svg plot: well-formed document with one circle per point and a legend", "[io][svg]") {
  const std::string s = render_svg(two_series());
  const std::string t = trimmed(s);
  CHECK(t.rfind("<svg", 0) == 0);
  CHECK(t.size() >= 6);
  CHECK(t.substr(t.size() - 6) == "</svg>");
  CHECK(xml_problem(s).empty());
  INFO(xml_problem(s));
  CHECK(count(s, "<circle") == 5);
  CHECK(s.find(">adam<") != std::string::npos);
  CHECK(s.find(">precond_sgd<") != std::string::npos);
  CHECK(s.find(">y = x<") != std::string::npos);
  CHECK(s.find("#123456") != std::string::npos);
  CHECK(s.find(">calibration<") != std::string::npos);
  CHECK(s.find(">measured<") != std::string::npos);
  CHECK(s.find(">predicted<") != std::string::npos);
  CHECK(s.find("stroke-dasharray") != std::string::npos);  // the y = x line
  require_finite_coordinates(s);
}

TEST_CASE("svg plot: a diamond series is drawn as paths, dodged sideways by its pixels", "[io][svg]") {
  ScatterPlot p = two_series();
  PlotSeries cv{"control variates", "", {{-0.019, -0.0175, 0.002}, {-0.0019, -0.0020, 0.0002}}};
  cv.marker = Marker::diamond;
  cv.dodge_px = 8;
  p.series.push_back(cv);
  const std::string s = render_svg(p);
  CHECK(xml_problem(s).empty());
  CHECK(count(s, "<circle") == 5);  // the diamonds are not circles
  CHECK(count(s, "<path d=\"M") == 2);
  CHECK(s.find(">control variates<") != std::string::npos);
  require_finite_coordinates(s);
  // The same points as circles, undodged: each diamond's top vertex sits 8 px
  // right of the circle's centre and 5 px above it.
  PlotSeries plain = cv;
  plain.marker = Marker::circle;
  plain.dodge_px = 0;
  ScatterPlot q = two_series();
  q.series.push_back(plain);
  const std::string t = render_svg(q);
  static const std::regex circle(R"re(<circle cx="([^"]*)" cy="([^"]*)")re");
  static const std::regex diamond(R"re(<path d="M([^ ]*) ([^L]*)L)re");
  std::vector<std::pair<double, double>> centres, tops;
  for (auto it = std::sregex_iterator(t.begin(), t.end(), circle); it != std::sregex_iterator(); ++it)
    centres.emplace_back(std::stod((*it)[1]), std::stod((*it)[2]));
  for (auto it = std::sregex_iterator(s.begin(), s.end(), diamond); it != std::sregex_iterator(); ++it)
    tops.emplace_back(std::stod((*it)[1]), std::stod((*it)[2]));
  REQUIRE(centres.size() == 7);
  REQUIRE(tops.size() == 2);
  for (std::size_t i = 0; i < 2; ++i) {
    CHECK(tops[i].first == Approx(centres[5 + i].first + 8).margin(0.011));
    CHECK(tops[i].second == Approx(centres[5 + i].second - 5).margin(0.011));
  }
}

TEST_CASE("svg plot: labels are escaped", "[io][svg]") {
  ScatterPlot p;
  p.title = "A<B & C>D";
  p.x_label = "x \"quoted\"";
  p.y_label = "y's";
  p.series.push_back({"<script>&amp", "", {{1, 2, 0.5}}});
  const std::string s = render_svg(p);
  CHECK(xml_problem(s).empty());
  INFO(xml_problem(s));
  CHECK(s.find("A&lt;B &amp; C&gt;D") != std::string::npos);
  CHECK(s.find("&lt;script&gt;&amp;amp") != std::string::npos);
  CHECK(s.find("<script>") == std::string::npos);
  CHECK(s.find("x &quot;quoted&quot;") != std::string::npos);
  CHECK(s.find("y&apos;s") != std::string::npos);
}

TEST_CASE("svg plot: negative values, degenerate and empty ranges stay finite", "[io][svg]") {
  SECTION("all negative") {
    ScatterPlot p;
    p.series.push_back({"neg", "", {{-5, -3, 1}, {-1e-3, -2e-3, 0}, {-2, -2.5, 0.1}}});
    const std::string s = render_svg(p);
    CHECK(xml_problem(s).empty());
    CHECK(count(s, "<circle") == 3);
    require_finite_coordinates(s);
    CHECK(s.find(">-") != std::string::npos);  // negative tick labels
  }
  SECTION("one point") {
    ScatterPlot p;
    p.series.push_back({"one", "", {{0.25, 0.25, 0}}});
    const std::string s = render_svg(p);
    CHECK(xml_problem(s).empty());
    CHECK(count(s, "<circle") == 1);
    require_finite_coordinates(s);
  }
  SECTION("all zero, separate ranges") {
    ScatterPlot p;
    p.equal_ranges = false;
    p.series.push_back({"zeros", "", {{0, 0, 0}, {0, 0, 0}}});
    const std::string s = render_svg(p);
    CHECK(count(s, "<circle") == 2);
    require_finite_coordinates(s);
  }
  SECTION("tiny values") {
    ScatterPlot p;
    p.series.push_back({"tiny", "", {{1e-12, 1.1e-12, 1e-13}, {3e-12, 2.9e-12, 1e-13}}});
    const std::string s = render_svg(p);
    CHECK(count(s, "<circle") == 2);
    require_finite_coordinates(s);
  }
  SECTION("no points at all") {
    ScatterPlot p;
    p.title = "empty";
    p.series.push_back({"nothing", "", {}});
    const std::string s = render_svg(p);
    CHECK(xml_problem(s).empty());
    CHECK(count(s, "<circle") == 0);
    require_finite_coordinates(s);
  }
  SECTION("non-finite points are left out and reported") {
    ScatterPlot p;
    const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
    p.series.push_back({"mixed", "", {{1, 1, 0}, {nan, 1, 0}, {1, inf, 0}, {2, 2, nan}}});
    const std::string s = render_svg(p);
    CHECK(xml_problem(s).empty());
    CHECK(count(s, "<circle") == 2);
    CHECK(s.find("2 non-finite points not shown") != std::string::npos);
    require_finite_coordinates(s);
  }
}

TEST_CASE("svg plot: symmetric-log axes keep values of both signs across decades apart", "[io][svg]") {
  ScatterPlot p = two_series();
  p.scale = AxisScale::symlog;
  p.series.push_back({"positive", "", {{3e-3, 2e-3, 1e-3}, {0, 0, 0}}});
  const std::string s = render_svg(p);
  CHECK(xml_problem(s).empty());
  INFO(xml_problem(s));
  CHECK(count(s, "<circle") == 7);
  CHECK(s.find("symmetric log axes") != std::string::npos);
  CHECK(s.find(">-0.01<") != std::string::npos);  // decade ticks of both signs
  CHECK(s.find(">0.001<") != std::string::npos);
  require_finite_coordinates(s);
  // The two smallest points, a decade apart, land well apart (on linear axes they would nearly coincide).
  static const std::regex circle(R"re(<circle cx="([-0-9.]+)" cy="([-0-9.]+)")re");
  std::vector<double> cx;
  for (auto it = std::sregex_iterator(s.begin(), s.end(), circle); it != std::sregex_iterator(); ++it)
    cx.push_back(std::stod((*it)[1]));
  REQUIRE(cx.size() == 7);
  CHECK(std::abs(cx[1] - cx[2]) > 40);

  SECTION("all zero") {
    ScatterPlot z;
    z.scale = AxisScale::symlog;
    z.series.push_back({"zeros", "", {{0, 0, 0}}});
    const std::string t = render_svg(z);
    CHECK(count(t, "<circle") == 1);
    require_finite_coordinates(t);
  }
}

TEST_CASE("svg plot: write_svg writes the document and names the path on failure", "[io][svg]") {
  const auto dir = std::filesystem::temp_directory_path() / "entropy_probe_test_svg_plot";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "plot.svg").string();
  const ScatterPlot p = two_series();
  write_svg(path, p);
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  CHECK(ss.str() == render_svg(p));
  std::filesystem::remove_all(dir);

  const std::string bad = "/nonexistent-dir-entropy-probe/sub/plot.svg";
  CHECK_THROWS_AS(write_svg(bad, p), InputError);
  CHECK_THROWS_WITH(write_svg(bad, p), Catch::Contains(bad));
}
