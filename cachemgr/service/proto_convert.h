// Conversions between cachemgr.v1 messages and the core's types. Request conversions validate
// enum fields (INVALID_ARGUMENT naming the field); the core validates everything else.
#pragma once

#include "absl/status/statusor.h"
#include "cachemgr/cache_manager.h"
#include "cachemgr/event_hub.h"
#include "cachemgr/v1/cachemgr.pb.h"

namespace cachemgr {

absl::StatusOr<ModelSpec> ModelSpecFromProto(const v1::ModelSpec& proto);
void ModelSpecToProto(const ModelSpec& spec, v1::ModelSpec* proto);

void AttachResultToProto(const AttachResult& result, const std::string& share_socket_path,
                         v1::AttachResponse* proto);
// Step's results, one per op; an allocation lists only the layers with new blocks or copies
// unless `include_slot_mapping`, and lists them once (StepResult.all_layers) when every layer
// got the same.
void StepResultsToProto(absl::Span<const StepOp> ops, absl::Span<const StepOpResult> results,
                        bool include_slot_mapping, v1::StepResponse* p);

void AllocateResultToProto(const std::string& sequence_id, const AllocateResult& result,
                           v1::AllocateResponse* proto);
void SequenceToProto(const SequenceSnapshot& seq, v1::SequenceInfo* proto);
void StatsToProto(const StatsSnapshot& stats, v1::StatsResponse* proto);
void EventToProto(const Event& event, v1::Event* proto);
v1::EventType EventTypeToProto(EventType type);

// Preset (INVALID_ARGUMENT naming policy.preset) + overrides; enum fields are validated.
absl::StatusOr<CompressParams> CompressParamsFromProto(const v1::CompressRequest& request);
void CompressResultToProto(const CompressResult& result, v1::CompressResponse* proto);
void FetchResultToProto(const std::vector<FetchedLayerResult>& layers, v1::FetchResponse* proto);
// A transfer's header (the transfer's own fields, transfer_id and destination, are the
// caller's). FromProto: INVALID_ARGUMENT naming header.* for an unknown dtype; the shape is
// checked against the receiving pool by CacheManager::BeginImport.
void SequenceImageHeaderToProto(const SequenceImageHeader& header, v1::SequenceImageHeader* proto);
absl::StatusOr<SequenceImageHeader> SequenceImageHeaderFromProto(
    const v1::SequenceImageHeader& proto);
void ParkResultToProto(const std::vector<ParkedLayerResult>& layers, v1::ParkResponse* proto);

}  // namespace cachemgr
