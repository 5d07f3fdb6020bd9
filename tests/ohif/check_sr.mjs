// OHIF 3.13.2's SR reader run on a pedetect SR, in node: @cornerstonejs/adapters 5.6.8 with dcmjs 0.52.0
// (the versions @ohif/app 3.13.2 bundles) turn each TID 1500 measurement group into cornerstone tool
// state, as OHIF's hydrateStructuredReport does (MeasurementReport.generateToolState, no hooks).
//
//   node check_sr.mjs SR.dcm IMAGES.json EXPECTED.json
//
// IMAGES.json: {"<SOPInstanceUID>:<frame>": {imagePlaneModule fields}} for every referenced slice (the
// metadata OHIF's provider gives cornerstone). EXPECTED.json: [{trackingUid, toolName, sop, frame,
// points: [[x, y, z], ...] (patient mm), closed}] per candidate. Prints what it found as JSON on stdout
// and exits 1 when a group did not become tool state or its coordinates differ (more than 1e-3 mm).
import fs from 'node:fs';
import dcmjs from 'dcmjs';
import * as core from '@cornerstonejs/core';
import { adaptersSR } from '@cornerstonejs/adapters';

const [srPath, imagesPath, expectedPath] = process.argv.slice(2);
const log = console.log;
console.log = (...args) => console.error(...args); // generateToolState logs every measurement: keep stdout for JSON

const images = JSON.parse(fs.readFileSync(imagesPath, 'utf8'));
const expected = JSON.parse(fs.readFileSync(expectedPath, 'utf8'));
const imageIds = {};
for (const key of Object.keys(images)) {
  imageIds[key] = `pedetect:${key}`;
}
core.metaData.addProvider((type, imageId) => {
  if (typeof imageId !== 'string' || !imageId.startsWith('pedetect:')) {
    return undefined;
  }
  const plane = images[imageId.slice('pedetect:'.length)];
  if (!plane) {
    return undefined;
  }
  if (type === 'imagePlaneModule') {
    return plane;
  }
  if (type === 'instance') {
    return { FrameOfReferenceUID: plane.frameOfReferenceUID, SOPInstanceUID: plane.sopInstanceUID };
  }
  return undefined;
}, 10000);

const buffer = fs.readFileSync(srPath);
const arrayBuffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
const dicomData = dcmjs.data.DicomMessage.readFile(arrayBuffer);
const dataset = dcmjs.data.DicomMetaDictionary.naturalizeDataset(dicomData.dict);

const { MeasurementReport } = adaptersSR.Cornerstone3D;
const toolState = MeasurementReport.generateToolState(dataset, imageIds, core.metaData);

// OHIF's isRehydratable: the adapter chosen by tracking identifier, else by graphic code and type.
const toArray = (x) => (x === undefined ? [] : Array.isArray(x) ? x : [x]);
const report = toArray(dataset.ContentSequence);
const measurements = report.find((item) => item.ConceptNameCodeSequence[0].CodeValue === '126010');
const groups = measurements ? toArray(measurements.ContentSequence) : [];
const rehydratable = groups.map((group) => {
  const items = toArray(group.ContentSequence);
  const tracking = items.find((item) => item.ConceptNameCodeSequence[0].CodeValue === '112039').TextValue;
  const graphic = items.find((item) => item.ValueType === 'SCOORD');
  const code = graphic.ConceptNameCodeSequence[0];
  const pointsLength = graphic.GraphicData.length / 2;
  const byTracking = MeasurementReport.getAdapterForTrackingIdentifier(tracking);
  const byType = MeasurementReport.getAdaptersForTypes(
    `${code.CodingSchemeDesignator}:${code.CodeValue}`,
    graphic.GraphicType,
    pointsLength
  );
  return { tracking, adapter: byTracking?.toolType ?? byType[0]?.toolType ?? null };
});

const found = [];
for (const [toolName, states] of Object.entries(toolState)) {
  for (const state of states) {
    const data = state.annotation.data;
    const points = toolName === 'PlanarFreehandROI' ? data.contour.polyline : data.handles.points;
    found.push({
      toolName,
      trackingUid: state.TrackingUniqueIdentifier,
      sop: state.sopInstanceUid,
      frame: data.frameNumber ?? 1,
      referencedImageId: state.annotation.metadata.referencedImageId,
      label: data.label ?? null,
      finding: state.finding?.CodeMeaning ?? null,
      findingSites: (state.findingSites ?? []).map((site) => site.CodeMeaning),
      closed: toolName === 'PlanarFreehandROI' ? data.contour.closed : null,
      points: points.map((p) => Array.from(p)),
    });
  }
}

const errors = [];
if (groups.length !== expected.length) {
  errors.push(`${groups.length} measurement groups, ${expected.length} candidates expected`);
}
for (const want of expected) {
  const got = found.find((f) => f.trackingUid === want.trackingUid);
  if (!got) {
    errors.push(`candidate ${want.trackingUid}: no tool state`);
    continue;
  }
  if (got.toolName !== want.toolName || got.sop !== want.sop || Number(got.frame) !== Number(want.frame)) {
    errors.push(`candidate ${want.trackingUid}: ${got.toolName} on ${got.sop}:${got.frame}, want ${want.toolName} on ${want.sop}:${want.frame}`);
  }
  if (want.closed !== null && got.closed !== want.closed) {
    errors.push(`candidate ${want.trackingUid}: closed ${got.closed}, want ${want.closed}`);
  }
  if (got.points.length !== want.points.length) {
    errors.push(`candidate ${want.trackingUid}: ${got.points.length} points, want ${want.points.length}`);
    continue;
  }
  got.points.forEach((p, i) => {
    const d = Math.max(...p.map((v, k) => Math.abs(v - want.points[i][k])));
    if (!(d <= 1e-3)) {
      errors.push(`candidate ${want.trackingUid}: point ${i} at ${p}, want ${want.points[i]}`);
    }
  });
}
for (const r of rehydratable) {
  if (!r.adapter) {
    errors.push(`group ${r.tracking}: not rehydratable`);
  }
}
log(JSON.stringify({ groups: groups.length, rehydratable, found, errors }, null, 1));
process.exit(errors.length ? 1 : 0);
