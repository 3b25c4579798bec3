#include "common/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "common/json_util.h"
#include "common/status_macros.h"
#include "glog/logging.h"
#include "nlohmann/json.hpp"

namespace gemma {
namespace {

using Json = nlohmann::json;

constexpr char kIndexFile[] = "model.safetensors.index.json";
constexpr char kSingleFile[] = "model.safetensors";

std::string Show(const Json& value) {
  std::string text = value.dump();
  if (text.size() > 80) text = text.substr(0, 77) + "...";
  return text;
}

// A non-negative JSON integer as uint64, or nullopt.
std::optional<uint64_t> AsU64(const Json& value) {
  if (value.is_number_unsigned()) return value.get<uint64_t>();
  if (value.is_number_integer()) {
    int64_t v = value.get<int64_t>();
    if (v >= 0) return static_cast<uint64_t>(v);
  }
  return std::nullopt;
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

int64_t TensorView::NumElements() const {
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;
  return n;
}

std::vector<int64_t> TensorView::Strides() const {
  std::vector<int64_t> strides(shape.size());
  int64_t stride = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= shape[i];
  }
  return strides;
}

std::string ShapeToString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) munmap(mapping_, mapping_size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    std::string message = absl::StrCat("cannot open safetensors file ", path, ": ", strerror(err));
    return err == ENOENT ? absl::NotFoundError(message) : absl::PermissionDeniedError(message);
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors file ", path, " is not a readable regular file"));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors file ", path, " is ", size, " bytes, shorter than its 8-byte header length"));
  }
  void* mapping = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int err = errno;
  close(fd);
  if (mapping == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot mmap safetensors file ", path, ": ", strerror(err)));
  }
  file->mapping_ = mapping;
  file->mapping_size_ = size;
  RETURN_IF_ERROR(file->Parse(static_cast<const uint8_t*>(mapping), size));
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBuffer(
    const uint8_t* data, size_t size, std::string_view name) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = std::string(name);
  RETURN_IF_ERROR(file->Parse(data, size));
  return file;
}

absl::Status SafetensorsFile::Parse(const uint8_t* data, size_t size) {
  const std::string& file = path_;
  if (size < 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors file ", file, " is ", size, " bytes, shorter than its 8-byte header length"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
  if (header_len > size - 8) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors file ", file, ": header length ",
                                                   header_len, " past the end of file of ", size,
                                                   " bytes"));
  }
  header_.assign(reinterpret_cast<const char*>(data + 8), header_len);
  const uint8_t* data_start = data + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;

  ASSIGN_OR_RETURN(Json header,
                   ParseJson(header_, absl::StrCat("safetensors file ", file, ": the header")));
  if (!header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors file ", file, ": the header is ",
                                                   header.type_name(), ", expected an object"));
  }

  struct Range {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Range> ranges;
  for (const auto& item : header.items()) {
    const std::string& name = item.key();
    const Json& entry = item.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "safetensors file ", file, ": __metadata__ is ", Show(entry), ", expected an object"));
      }
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          return absl::InvalidArgumentError(absl::StrCat("safetensors file ", file,
                                                         ": __metadata__.", key, " is ",
                                                         Show(value), ", expected a string"));
        }
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    auto bad = [&](absl::string_view what) {
      return absl::InvalidArgumentError(
          absl::StrCat("safetensors file ", file, ": tensor '", name, "': ", what));
    };
    if (!entry.is_object())
      return bad(absl::StrCat("entry is ", Show(entry), ", expected an object"));
    auto dtype_it = entry.find("dtype");
    auto shape_it = entry.find("shape");
    auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end() || !dtype_it->is_string()) {
      return bad("missing or non-string \"dtype\"");
    }
    absl::StatusOr<DType> dtype = ParseDType(dtype_it->get<std::string>());
    if (!dtype.ok()) return bad(dtype.status().message());
    if (shape_it == entry.end() || !shape_it->is_array()) {
      return bad("missing \"shape\" list");
    }
    TensorView view;
    view.name = name;
    view.dtype = *dtype;
    view.file = file;
    uint64_t num_elements = 1;
    for (const Json& dim : *shape_it) {
      std::optional<uint64_t> d = AsU64(dim);
      if (!d || *d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return bad(absl::StrCat("shape ", Show(*shape_it), " has a dimension ", Show(dim),
                                " that is not a non-negative integer"));
      }
      if (__builtin_mul_overflow(num_elements, *d, &num_elements) ||
          num_elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return bad(absl::StrCat("shape ", Show(*shape_it), " overflows the element count"));
      }
      view.shape.push_back(static_cast<int64_t>(*d));
    }
    uint64_t num_bytes = 0;
    if (__builtin_mul_overflow(num_elements, DTypeSize(*dtype), &num_bytes)) {
      return bad(absl::StrCat("shape ", Show(*shape_it), " overflows the byte count"));
    }
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
        !AsU64((*offsets_it)[0]) || !AsU64((*offsets_it)[1])) {
      return bad("\"data_offsets\" must be a list of two non-negative integers");
    }
    uint64_t begin = *AsU64((*offsets_it)[0]);
    uint64_t end = *AsU64((*offsets_it)[1]);
    if (begin > end) {
      return bad(absl::StrCat("data_offsets [", begin, ", ", end, "] has begin > end"));
    }
    if (end > data_size) {
      return bad(absl::StrCat("data_offsets [", begin, ", ", end,
                              "] past the end of the data section of ", data_size, " bytes"));
    }
    if (end - begin != num_bytes) {
      return bad(absl::StrCat("data_offsets [", begin, ", ", end, "] hold ", end - begin,
                              " bytes but shape ", ShapeToString(view.shape), " of ",
                              std::string(DTypeName(*dtype)), " needs ", num_bytes));
    }
    view.data = data_start + begin;
    view.num_bytes = static_cast<size_t>(num_bytes);
    auto [it, inserted] = tensors_.emplace(name, std::move(view));
    ranges.push_back({begin, end, &it->first});
  }

  // No two non-empty tensors may share a byte.
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const Range* furthest = nullptr;  // the non-empty range seen so far that reaches furthest
  for (const Range& range : ranges) {
    if (range.begin == range.end) continue;
    if (furthest != nullptr && range.begin < furthest->end) {
      return absl::InvalidArgumentError(absl::StrCat(
          "safetensors file ", file, ": tensors '", *furthest->name, "' (data_offsets [",
          furthest->begin, ", ", furthest->end, "]) and '", *range.name, "' (data_offsets [",
          range.begin, ", ", range.end, "]) overlap"));
    }
    if (furthest == nullptr || range.end > furthest->end) furthest = &range;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::file_status status = fs::status(dir, ec);
  if (!fs::exists(status)) {
    return absl::NotFoundError(absl::StrCat("checkpoint directory ", dir, " does not exist"));
  }
  if (!fs::is_directory(status)) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint path ", dir, " is not a directory"));
  }
  auto checkpoint = std::make_unique<Checkpoint>();
  checkpoint->dir_ = dir;
  const fs::path root(dir);

  // Which files to open, and (for an index) which tensor each must hold.
  std::vector<std::string> paths;
  std::map<std::string, std::vector<std::string>> expected;  // path -> tensors from the index
  const fs::path index_path = root / kIndexFile;
  if (fs::exists(index_path, ec)) {
    ASSIGN_OR_RETURN(std::string text, ReadTextFile(index_path.string()));
    ASSIGN_OR_RETURN(Json index, ParseJson(text, index_path.string()));
    auto weight_map = index.is_object() ? index.find("weight_map") : index.end();
    if (!index.is_object() || weight_map == index.end() || !weight_map->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path.string(), ": expected an object with a \"weight_map\" object"));
    }
    for (const auto& [tensor, shard] : weight_map->items()) {
      if (!shard.is_string() || shard.get<std::string>().empty()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path.string(), ": weight_map['",
                                                       tensor, "'] is ", Show(shard),
                                                       ", expected a shard file name"));
      }
      std::string shard_path = (root / shard.get<std::string>()).string();
      auto [it, inserted] = expected.try_emplace(shard_path);
      if (inserted) paths.push_back(shard_path);
      it->second.push_back(tensor);
    }
    std::sort(paths.begin(), paths.end());
  } else if (fs::exists(root / kSingleFile, ec)) {
    paths.push_back((root / kSingleFile).string());
  } else {
    for (const fs::directory_entry& entry : fs::directory_iterator(root, ec)) {
      if (entry.path().extension() == ".safetensors") paths.push_back(entry.path().string());
    }
    if (ec) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot list checkpoint directory ", dir, ": ", ec.message()));
    }
    std::sort(paths.begin(), paths.end());
  }
  if (paths.empty()) {
    return absl::NotFoundError(absl::StrCat("no ", kIndexFile, ", ", kSingleFile,
                                            " or *.safetensors file in checkpoint directory ",
                                            dir));
  }

  for (const std::string& path : paths) {
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
    for (const std::string& tensor : expected[path]) {
      if (file->tensors().count(tensor) == 0) {
        return absl::NotFoundError(absl::StrCat("tensor '", tensor, "' listed in ",
                                                index_path.string(), " is not in shard ", path));
      }
    }
    for (const auto& [name, view] : file->tensors()) {
      auto [it, inserted] = checkpoint->index_.emplace(name, view);
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", name,
                                                       "' is in two files of checkpoint ", dir,
                                                       ": ", it->second.file, " and ", path));
      }
    }
    checkpoint->files_.push_back(std::move(file));
  }
  VLOG(1) << "checkpoint " << dir << ": " << checkpoint->index_.size() << " tensors in "
          << checkpoint->files_.size() << " file(s)";
  return checkpoint;
}

absl::StatusOr<TensorView> Checkpoint::Get(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(
        absl::StrCat("tensor '", std::string(name), "' not found in checkpoint ", dir_));
  }
  return it->second;
}

bool Checkpoint::Has(std::string_view name) const { return index_.find(name) != index_.end(); }

absl::StatusOr<TensorView> Checkpoint::GetWithShape(std::string_view name,
                                                    const std::vector<int64_t>& shape) const {
  ASSIGN_OR_RETURN(TensorView view, Get(name));
  if (view.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor '", std::string(name), "' in ", view.file, " has shape ", ShapeToString(view.shape),
        ", expected ", ShapeToString(shape), " (from config.json)"));
  }
  return view;
}

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [name, view] : index_) names.push_back(name);
  return names;
}

}  // namespace gemma
