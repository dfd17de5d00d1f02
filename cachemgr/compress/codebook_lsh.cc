#include "cachemgr/compress/codebook_lsh.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <numbers>
#include <utility>

#include "cachemgr/compress/codebook_graph.h"
#include "cachemgr/compress/vector_kernels.h"

namespace cachemgr::compress {
namespace {

// Radius and width-factor floors: at theta = 1 (duplicates only) r would be 0; any positive width
// keeps identical vectors in one bucket, and these keep the quantised values (|g . x| / w, a
// Gaussian direction's projection of a unit vector, at most |g|: about sqrt(dim)) far inside
// int32.
constexpr double kMinRadius = 1e-3;
constexpr double kMinWidthFactor = 1e-3;

// Candidate pairs are verified in batches of this many (bounded memory whatever the buckets).
constexpr size_t kPairBatch = 16384;

// LshMatchEntries lists at most this many (query, entry) candidates of a chunk (64 MiB); more,
// and it compares every query with every entry instead.
constexpr uint64_t kMaxListedCandidates = uint64_t{16} << 20;

// SplitMix64 (Steele, Lea, Flood 2014): a small seeded generator whose sequence is the same on
// every platform, unlike the distributions of <random>.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in (0, 1).
  double Uniform() { return (static_cast<double>(Next() >> 11) + 0.5) * 0x1.0p-53; }
  // Standard normal (Box-Muller).
  double Gaussian() {
    const double u = Uniform();
    const double v = Uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(2.0 * std::numbers::pi * v);
  }

 private:
  uint64_t state_;
};

// Sorts `words` by their bits [low, low + bits), keeping the input order among equal ones: an
// LSD radix sort, 11 bits a pass; `scratch` as large as `words`.
void RadixSort(uint64_t* words, size_t n, int low, int bits, uint64_t* scratch) {
  uint64_t* from = words;
  uint64_t* to = scratch;
  for (int shift = low; shift < low + bits; shift += 11) {
    const int pass_bits = std::min(11, low + bits - shift);
    const uint64_t mask = (uint64_t{1} << pass_bits) - 1;
    size_t count[2048] = {};
    for (size_t i = 0; i < n; ++i) ++count[(from[i] >> shift) & mask];
    size_t sum = 0;
    for (size_t b = 0; b <= mask; ++b) sum += std::exchange(count[b], sum);
    for (size_t i = 0; i < n; ++i) to[count[(from[i] >> shift) & mask]++] = from[i];
    std::swap(from, to);
  }
  if (from != words) std::copy_n(from, n, words);
}

// Sorts packed (32-bit key << 32 | 32-bit index) words by key, keeping index order within a key.
void SortByKey(uint64_t* words, size_t n, uint64_t* scratch) {
  RadixSort(words, n, 32, 32, scratch);
}

// Buckets of at least this many vectors are verified all-pairs by the blocked kernel on a
// gathered copy (each member loaded once, eight pairs at a time); smaller ones pair by pair.
constexpr size_t kBlockedBucket = 16;

struct BucketScratch {
  std::vector<float> rows;        // [size, dim]
  std::vector<float> transposed;  // [ceil(size / 8)][dim][8]
  std::vector<uint8_t> nonzero;   // all 1: zero vectors are never hashed
  std::vector<uint64_t> local;    // [size, ceil(size / 64)]
};

// All pairs of one bucket (`members`: packed words, the vector in the low half), by
// similarity_pairs on a gathered copy: the same edge test as SimilarityAdjacency, so the same
// decisions. Sets the edges in `adjacency`; returns how many were not set before, and appends
// those to `edges` (when not null) as i << 32 | j, i < j.
size_t VerifyBucket(const VectorKernels& kernels, const float* unit, uint32_t dim, float theta,
                    const uint64_t* members, size_t size, size_t words, uint64_t* adjacency,
                    BucketScratch* scratch, std::vector<uint64_t>* edges) {
  const size_t local_words = (size + 63) / 64;
  scratch->rows.resize(size * dim);
  scratch->transposed.assign((size + 7) / 8 * 8 * dim, 0.0f);
  scratch->nonzero.assign(size, 1);
  scratch->local.assign(size * local_words, 0);
  for (size_t x = 0; x < size; ++x) {
    const float* src = &unit[size_t{static_cast<uint32_t>(members[x])} * dim];
    std::copy_n(src, dim, &scratch->rows[x * dim]);
    for (uint32_t k = 0; k < dim; ++k) {
      scratch->transposed[(x / 8) * 8 * dim + size_t{k} * 8 + x % 8] = src[k];
    }
  }
  kernels.similarity_pairs(scratch->rows.data(), scratch->transposed.data(),
                           scratch->nonzero.data(), size, dim, theta, scratch->local.data());
  size_t added = 0;
  for (size_t x = 0; x < size; ++x) {
    const auto i = static_cast<uint32_t>(members[x]);
    const uint64_t* row = &scratch->local[x * local_words];
    // Bits y > x only (the kernel sets both halves and no self-loop).
    for (size_t w = (x + 1) / 64; w < local_words; ++w) {
      uint64_t bits = row[w];
      if (w == (x + 1) / 64) bits &= ~uint64_t{0} << ((x + 1) % 64);
      while (bits != 0) {
        const size_t y = w * 64 + std::countr_zero(bits);
        bits &= bits - 1;
        const auto j = static_cast<uint32_t>(members[y]);
        uint64_t& ij = adjacency[size_t{i} * words + j / 64];
        const uint64_t bit = uint64_t{1} << (j % 64);
        if (ij & bit) continue;
        ij |= bit;
        adjacency[size_t{j} * words + i / 64] |= uint64_t{1} << (i % 64);
        if (edges != nullptr) edges->push_back(uint64_t{i} << 32 | j);
        ++added;
      }
    }
  }
  return added;
}

size_t CountEdges(const uint64_t* adjacency, size_t n) {
  const size_t words = (n + 63) / 64;
  size_t bits = 0;
  for (size_t w = 0; w < n * words; ++w) bits += std::popcount(adjacency[w]);
  return (bits - n) / 2;  // minus the self-loops, each pair counted twice
}

}  // namespace

LshFamily::LshFamily(uint32_t dim, float theta, const LshParams& params)
    : dim_(dim), params_(params) {
  params_.tables = std::max(1u, params_.tables);
  params_.hashes_per_table = std::clamp(params_.hashes_per_table, 1u, kLshProjections);
  const double radius = std::max(kMinRadius, std::sqrt(std::max(0.0, 2.0 * (1.0 - theta))));
  inverse_width_ =
      static_cast<float>(1.0 / (std::max(kMinWidthFactor, double{params_.width_factor}) * radius));
  SplitMix64 rng(params_.seed);
  directions_.resize(size_t{dim} * kLshProjections);
  for (float& g : directions_) g = static_cast<float>(rng.Gaussian());
  const size_t hashes = size_t{params_.tables} * params_.hashes_per_table;
  offsets_.resize(hashes);
  chosen_.resize(hashes);
  std::vector<uint32_t> order(kLshProjections);
  for (uint32_t t = 0; t < params_.tables; ++t) {
    for (uint32_t p = 0; p < kLshProjections; ++p) order[p] = p;
    for (uint32_t h = 0; h < params_.hashes_per_table; ++h) {  // partial Fisher-Yates
      const uint32_t pick = h + static_cast<uint32_t>(rng.Next() % (kLshProjections - h));
      std::swap(order[h], order[pick]);
      chosen_[size_t{t} * params_.hashes_per_table + h] = order[h];
      offsets_[size_t{t} * params_.hashes_per_table + h] = static_cast<float>(rng.Uniform());
    }
  }
  multipliers_.resize(hashes);
  for (uint32_t& a : multipliers_) a = static_cast<uint32_t>(rng.Next() >> 32) | 1u;
}

void LshFamily::Project(const float* rows, size_t n, float* out) const {
  // The kernel writes a row's projections side by side; they are transposed a few rows at a time
  // (the block stays in L1) so that Keys() reads each projection contiguously.
  constexpr size_t kBlockRows = 64;
  float block[kBlockRows * kLshProjections];
  const VectorKernels& kernels = SelectedVectorKernels();
  for (size_t r0 = 0; r0 < n; r0 += kBlockRows) {
    const size_t count = std::min(kBlockRows, n - r0);
    kernels.lsh_project(rows + r0 * dim_, count, dim_, directions_.data(), block);
    for (uint32_t p = 0; p < kLshProjections; ++p) {
      for (size_t r = 0; r < count; ++r) out[p * n + r0 + r] = block[r * kLshProjections + p];
    }
  }
}

void LshFamily::Keys(uint32_t table, const float* projections, size_t n, uint32_t* keys) const {
  std::fill_n(keys, n, 0u);
  const size_t base = size_t{table} * params_.hashes_per_table;
  for (uint32_t h = 0; h < params_.hashes_per_table; ++h) {
    const float* column = projections + size_t{chosen_[base + h]} * n;
    const float offset = offsets_[base + h];
    const uint32_t multiplier = multipliers_[base + h];
    // floor(g . x / w + offset) by truncation and a correction (one vectorisable loop): the
    // projections of unit vectors are far inside int32.
    for (size_t r = 0; r < n; ++r) {
      const float value = column[r] * inverse_width_ + offset;
      auto bucket = static_cast<int32_t>(value);
      bucket -= value < static_cast<float>(bucket) ? 1 : 0;
      keys[r] += static_cast<uint32_t>(bucket) * multiplier;
    }
  }
}

absl::Status LshSimilarityAdjacency(const float* unit, const uint8_t* nonzero, size_t n,
                                    uint32_t dim, float theta, uint64_t* adjacency,
                                    const LshParams& params, LshStats* stats,
                                    const SimilarityGraphBuilder* exact,
                                    std::vector<uint64_t>* edges) {
  if (edges != nullptr) edges->clear();
  // The edge list is kept while it is no larger than half the bitset (a hostile input of a few
  // tight clusters could make it n^2 / 4 pairs); past that it is dropped, left empty.
  std::vector<uint64_t>* edge_list = edges;
  const size_t max_listed_edges = n * ((n + 63) / 64) / 2;
  auto bound_edge_list = [&] {
    if (edge_list != nullptr && edge_list->size() > max_listed_edges) {
      edge_list->clear();
      edge_list->shrink_to_fit();
      edge_list = nullptr;
    }
  };
  LshStats local;
  LshStats& s = stats != nullptr ? *stats : local;
  s = {};
  const size_t words = (n + 63) / 64;
  auto exact_pass = [&]() -> absl::Status {
    s.exact = true;
    if (exact == nullptr) {
      SimilarityAdjacency(unit, nonzero, n, dim, theta, adjacency);
    } else if (absl::Status built = exact->Build(unit, nonzero, n, dim, theta, adjacency);
               !built.ok()) {
      return built;
    }
    s.edges = CountEdges(adjacency, n);
    return absl::OkStatus();
  };

  std::vector<uint32_t> live;  // zero vectors are similar to nothing
  for (size_t i = 0; i < n; ++i) {
    if (nonzero[i]) live.push_back(static_cast<uint32_t>(i));
  }
  const size_t m = live.size();
  if (m < params.exact_below || m < 2) return exact_pass();

  const LshFamily family(dim, theta, params);
  constexpr uint32_t projections = kLshProjections;
  const uint32_t tables = family.params().tables;
  std::vector<float> projected(size_t{projections} * m);
  if (m == n) {
    family.Project(unit, n, projected.data());
  } else {
    std::vector<float> rows(m * dim);
    for (size_t r = 0; r < m; ++r) std::copy_n(&unit[size_t{live[r]} * dim], dim, &rows[r * dim]);
    family.Project(rows.data(), m, projected.data());
  }

  // Each table's vectors sorted by (32-bit key, index), packed in one word: a bucket is a run
  // of equal high halves, its vectors ascending. (Two tuples of buckets with the same 32-bit key
  // only merge two buckets: a few more candidates, never a missed pair.)
  std::vector<uint64_t> keyed(size_t{tables} * m);
  std::vector<uint64_t> scratch(m);
  std::vector<uint32_t> keys(m);
  uint64_t candidates = 0;
  uint64_t small_bucket_pairs = 0;  // at most tables * m * (kBlockedBucket - 2) / 2
  for (uint32_t t = 0; t < tables; ++t) {
    uint64_t* table = &keyed[size_t{t} * m];
    family.Keys(t, projected.data(), m, keys.data());
    for (size_t r = 0; r < m; ++r) table[r] = (uint64_t{keys[r]} << 32) | live[r];
    SortByKey(table, m, scratch.data());
    for (size_t a = 0; a < m;) {
      size_t b = a + 1;
      while (b < m && (table[b] >> 32) == (table[a] >> 32)) ++b;
      const uint64_t pairs = uint64_t{b - a} * (b - a - 1) / 2;
      candidates += pairs;
      if (b - a < kBlockedBucket) small_bucket_pairs += pairs;
      a = b;
    }
  }
  s.candidate_pairs = candidates;
  // A listed pair costs about twice a pair of the blocked exact pass.
  const uint64_t all_pairs = uint64_t{m} * (m - 1) / 2;
  if (candidates > all_pairs / 2) return exact_pass();
  for (size_t i = 0; i < n; ++i) adjacency[i * words + i / 64] |= uint64_t{1} << (i % 64);

  // A large bucket goes to the blocked kernel whole. The pairs of the small ones are collected
  // from every table, sorted and deduplicated, and tested once each in row order: a pair that
  // several tables put together costs one test, and the bitset is walked row by row, not at
  // random (random bit probes into an n^2 / 8-byte bitset were most of this function's time on
  // diffuse data, mostly cache misses).
  const VectorKernels& kernels = SelectedVectorKernels();
  const int index_bits = std::bit_width(n - 1);
  std::vector<uint64_t> listed;  // i << index_bits | j, i < j
  listed.reserve(small_bucket_pairs);
  BucketScratch scratch_bucket;
  for (uint32_t t = 0; t < tables; ++t) {
    const uint64_t* table = &keyed[size_t{t} * m];
    for (size_t a = 0; a < m;) {
      size_t b = a + 1;
      while (b < m && (table[b] >> 32) == (table[a] >> 32)) ++b;
      if (b - a >= kBlockedBucket) {
        s.verified_pairs += uint64_t{b - a} * (b - a - 1) / 2;
        s.edges += VerifyBucket(kernels, unit, dim, theta, table + a, b - a, words, adjacency,
                                &scratch_bucket, edge_list);
        bound_edge_list();
      } else {
        // Members ascend (the sort keeps index order within a key), so i < j.
        for (size_t x = a; x < b; ++x) {
          const uint64_t i = static_cast<uint32_t>(table[x]);
          for (size_t y = x + 1; y < b; ++y) {
            listed.push_back(i << index_bits | static_cast<uint32_t>(table[y]));
          }
        }
      }
      a = b;
    }
  }
  {
    std::vector<uint64_t> sort_scratch(listed.size());
    RadixSort(listed.data(), listed.size(), 0, 2 * index_bits, sort_scratch.data());
  }
  listed.erase(std::unique(listed.begin(), listed.end()), listed.end());
  const uint64_t j_mask = (uint64_t{1} << index_bits) - 1;
  std::vector<uint32_t> batch;
  batch.reserve(2 * kPairBatch);
  auto flush = [&] {
    s.verified_pairs += batch.size() / 2;
    s.edges += kernels.similar_listed_pairs(unit, dim, theta, batch.data(), batch.size() / 2, words,
                                            adjacency);
    if (edge_list != nullptr) {  // the pairs just found similar: their bits are set now
      for (size_t p = 0; p < batch.size(); p += 2) {
        const uint32_t i = batch[p];
        const uint32_t j = batch[p + 1];
        if ((adjacency[size_t{i} * words + j / 64] >> (j % 64)) & 1) {
          edge_list->push_back(uint64_t{i} << 32 | j);
        }
      }
      bound_edge_list();
    }
    batch.clear();
  };
  // The blocked kernel's edges are skipped: found in the bitset, or, where they were listed
  // too, by walking them sorted beside `listed` (no probe of the bitset per pair).
  std::vector<uint64_t> blocked;
  const bool blocked_listed = edge_list != nullptr;
  if (blocked_listed) {
    blocked.reserve(edge_list->size());
    for (uint64_t e : *edge_list) {
      blocked.push_back((e >> 32) << index_bits | static_cast<uint32_t>(e));
    }
    std::vector<uint64_t> sort_scratch(blocked.size());
    RadixSort(blocked.data(), blocked.size(), 0, 2 * index_bits, sort_scratch.data());
  }
  size_t next_blocked = 0;
  for (const uint64_t pair : listed) {
    const auto i = static_cast<uint32_t>(pair >> index_bits);
    const auto j = static_cast<uint32_t>(pair & j_mask);
    if (blocked_listed) {
      while (next_blocked < blocked.size() && blocked[next_blocked] < pair) ++next_blocked;
      if (next_blocked < blocked.size() && blocked[next_blocked] == pair) continue;
    } else if ((adjacency[size_t{i} * words + j / 64] >> (j % 64)) & 1) {
      continue;  // a blocked edge
    }
    batch.push_back(i);
    batch.push_back(j);
    if (batch.size() == 2 * kPairBatch) flush();
  }
  flush();
  return absl::OkStatus();
}

void LshMatchEntries(const float* entries, size_t known, const float* queries,
                     const uint8_t* nonzero, size_t count, uint32_t dim, float theta,
                     int64_t* matches, const LshParams& params) {
  const VectorKernels& kernels = SelectedVectorKernels();
  std::fill_n(matches, count, -1);
  size_t live = 0;
  for (size_t q = 0; q < count; ++q) live += nonzero[q] ? 1 : 0;
  if (known == 0 || live == 0) return;
  auto match_all = [&] {  // MatchEntry itself
    for (size_t q = 0; q < count; ++q) {
      if (nonzero[q])
        matches[q] = kernels.match_entry(entries, known, dim, &queries[q * dim], theta);
    }
  };
  if (known < params.exact_below) return match_all();

  const LshFamily family(dim, theta, params);
  const uint32_t tables = family.params().tables;
  std::vector<float> entry_projections(kLshProjections * known);
  std::vector<float> query_projections(kLshProjections * count);
  family.Project(entries, known, entry_projections.data());
  family.Project(queries, count, query_projections.data());
  // Per table, entries and live queries sorted by key (packed as in LshSimilarityAdjacency).
  std::vector<uint64_t> entry_keys(size_t{tables} * known);
  std::vector<uint64_t> query_keys(size_t{tables} * live);
  std::vector<uint64_t> scratch(std::max(known, live));
  std::vector<uint32_t> entry_key(known);
  std::vector<uint32_t> query_key(count);
  for (uint32_t t = 0; t < tables; ++t) {
    uint64_t* ek = &entry_keys[size_t{t} * known];
    family.Keys(t, entry_projections.data(), known, entry_key.data());
    for (size_t e = 0; e < known; ++e) ek[e] = (uint64_t{entry_key[e]} << 32) | e;
    SortByKey(ek, known, scratch.data());
    uint64_t* qk = &query_keys[size_t{t} * live];
    family.Keys(t, query_projections.data(), count, query_key.data());
    for (size_t q = 0, r = 0; q < count; ++q) {
      if (nonzero[q]) qk[r++] = (uint64_t{query_key[q]} << 32) | q;
    }
    SortByKey(qk, live, scratch.data());
  }
  // Walks each table's two sorted lists together; fn(query, first entry word, entries).
  auto for_each_shared_bucket = [&](auto&& fn) {
    for (uint32_t t = 0; t < tables; ++t) {
      const uint64_t* ek = &entry_keys[size_t{t} * known];
      const uint64_t* qk = &query_keys[size_t{t} * live];
      size_t e = 0;
      for (size_t q = 0; q < live;) {
        const uint64_t key = qk[q] >> 32;
        size_t q_end = q + 1;
        while (q_end < live && (qk[q_end] >> 32) == key) ++q_end;
        while (e < known && (ek[e] >> 32) < key) ++e;
        size_t e_end = e;
        while (e_end < known && (ek[e_end] >> 32) == key) ++e_end;
        if (e_end > e) {
          for (size_t x = q; x < q_end; ++x) fn(static_cast<uint32_t>(qk[x]), ek + e, e_end - e);
        }
        q = q_end;
      }
    }
  };
  // Candidate lists per query (with repeats across tables), laid out by a counting pass.
  std::vector<uint64_t> offsets(count + 1, 0);
  for_each_shared_bucket([&](uint32_t q, const uint64_t*, size_t size) { offsets[q + 1] += size; });
  for (size_t q = 0; q < count; ++q) offsets[q + 1] += offsets[q];
  // As many candidates as comparing every query with every entry (hashing does not separate
  // this data; MatchEntry is then as cheap and exact), or more than kMaxListedCandidates (their
  // list must not grow with known * live: 96k entries x 16k queries would be gigabytes).
  if (offsets[count] > std::min<uint64_t>(uint64_t{known} * live / 2, kMaxListedCandidates)) {
    return match_all();
  }
  std::vector<uint32_t> candidates(offsets[count]);
  std::vector<uint64_t> fill(offsets.begin(), offsets.end() - 1);
  for_each_shared_bucket([&](uint32_t q, const uint64_t* bucket, size_t size) {
    for (size_t k = 0; k < size; ++k) candidates[fill[q]++] = static_cast<uint32_t>(bucket[k]);
  });
  for (size_t q = 0; q < count; ++q) {
    uint32_t* first = candidates.data() + offsets[q];
    uint32_t* last = candidates.data() + offsets[q + 1];
    if (first == last) continue;
    std::sort(first, last);
    last = std::unique(first, last);
    matches[q] = kernels.match_listed_entry(entries, first, static_cast<size_t>(last - first), dim,
                                            &queries[q * dim], theta);
  }
}

}  // namespace cachemgr::compress
